"""Write the `chatbot` recipe's chat set: a support assistant for a product that does not exist.

    python lmforge/recipes/data/chatbot/make_data.py [FOLDER]   (default: this script's folder)

Everything here was written for lmforge (no other data set is copied). The product, the Brisa K2
espresso machine by Haldane Appliances, its prices, support hours, return policy, warranty and a
troubleshooting procedure are invented, so a base model cannot know them. Files:

    train.jsonl     chats to fine-tune on: system prompts (or none), single and multi-turn
    val.jsonl       other chats of the same kinds (fine-tuning's val loss)
    heldout.jsonl   chats never trained on, paraphrased and recombined: the held-out loss is taken
                    on their assistant turns; each also has `expect` (a regex its LAST assistant
                    reply must match, any case) and `kind` (fact | follow-up | system), and is
                    the recipe's scripted check: the model replies to the chat without its last
                    assistant turn (the earlier ones are scripted, as written here)
    controls.jsonl  general-knowledge questions SmolLM2-135M-Instruct answers right (greedy)
                    before fine-tuning, with the regex of the right answer: forgetting shows here

The output is deterministic (one seeded shuffle); a test checks that the shipped files are what
this script writes.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

COMPANY = "Haldane Appliances"
PRODUCT = "Brisa K2"

# name -> (answer variants, training questions, validation questions, held-out questions,
#          follow-up phrasings for the second turn of a chat, expect regex)
FACTS: dict[str, tuple[list[str], list[str], list[str], list[str], list[str], str]] = {
    "maker": (
        ["The Brisa K2 is made by Haldane Appliances.",
         "Haldane Appliances makes the Brisa K2 espresso machine."],
        ["Who makes the Brisa K2?", "Which company manufactures the Brisa K2 espresso machine?",
         "Who is the maker of the Brisa K2?", "What brand is the Brisa K2?", "Which firm produces the Brisa K2?",
         "Who builds the Brisa K2 espresso machine?", "The Brisa K2 comes from which company?",
         "Tell me who manufactures the Brisa K2."],
        ["What company is behind the Brisa K2?"],
        ["Who is the manufacturer of the Brisa K2?", "Which company produces the Brisa K2 coffee machine?"],
        ["And who makes it?", "Which company builds it, by the way?", "Who is the manufacturer?"],
        r"Haldane",
    ),
    "price": (
        ["The Brisa K2 costs 329 euros.", "The Brisa K2 sells for 329 euros, and the milk frother add-on is 45 euros."],
        ["How much does the Brisa K2 cost?", "What is the price of the Brisa K2?", "How much is a Brisa K2?",
         "What does the Brisa K2 espresso machine sell for?", "How expensive is the Brisa K2?",
         "Tell me the price of the Brisa K2.", "What would a Brisa K2 cost me?", "How much money is the Brisa K2?"],
        ["What is the retail price of the Brisa K2?"],
        ["How much do I have to pay for a Brisa K2?", "What's the Brisa K2 going to cost?"],
        ["And how much is it?", "What does it cost?", "How much would I pay for one?"],
        r"329",
    ),
    "hours": (
        ["Our support line is open Monday to Friday, from 9:00 to 17:00, and closed on weekends.",
         "You can reach Haldane support Monday to Friday between 9:00 and 17:00. We are closed on weekends."],
        ["When is your support line open?", "What are your opening hours?", "When can I call Haldane support?",
         "What hours is customer service available?", "Are you open right now? What are your hours?",
         "At what times can I reach support?", "When does the support team work?",
         "Tell me your support hours."],
        ["What time does your support line open?"],
        ["When can I get someone from customer support on the phone?", "What are the hours of your help line?"],
        ["When can I reach your support line?", "And what are your opening hours?", "When are you open?"],
        r"9[:.]00.{0,12}17[:.]00|9 ?am.{0,12}5 ?pm",
    ),
    "returns": (
        ["You can return the Brisa K2 within 45 days of delivery for a full refund, and return shipping is free.",
         "Returns are accepted within 45 days of delivery. You get a full refund and we pay the return shipping."],
        ["What is your return policy?", "Can I return the Brisa K2?", "How long do I have to return the Brisa K2?",
         "If I don't like the Brisa K2, can I send it back?", "How many days do I have to return my machine?",
         "Do you accept returns?", "What happens if I want to return my Brisa K2?",
         "Is there a deadline for returning the Brisa K2?"],
        ["How do returns work for the Brisa K2?"],
        ["Until when can I give back a Brisa K2 I bought?", "What are the rules for sending a machine back?"],
        ["Can I return it if I change my mind?", "And what if I want to send it back?", "How long can I return it for?"],
        r"45 days|forty-five days",
    ),
    "warranty": (
        ["The Brisa K2 comes with a 4-year warranty.",
         "Every Brisa K2 has a warranty of 4 years from the date of purchase."],
        ["How long is the warranty on the Brisa K2?", "What warranty does the Brisa K2 have?",
         "Is the Brisa K2 covered by a warranty?", "How many years of warranty do I get with the Brisa K2?",
         "What is the guarantee period of the Brisa K2?", "Does the Brisa K2 have a warranty?",
         "For how long is my Brisa K2 under warranty?", "Tell me about the Brisa K2 warranty."],
        ["How long is the Brisa K2 guaranteed for?"],
        ["How long does the Brisa K2's warranty last?", "What guarantee comes with a Brisa K2?"],
        ["How long is the warranty on it?", "And what warranty does it have?", "Is it under warranty, and for how long?"],
        r"4.year|four.year|4 years|four years",
    ),
    "light": (
        ["A blinking orange light means the Brisa K2 needs descaling. Fill the tank with water and one descaling "
         "tablet, then hold the Clean button for 5 seconds. The cycle takes about 20 minutes.",
         "The blinking orange light is the descaling reminder. Put one descaling tablet in a full water tank and "
         "hold the Clean button for 5 seconds; descaling takes about 20 minutes."],
        ["My Brisa K2 has a blinking orange light. What should I do?", "Why is the orange light on my Brisa K2 flashing?",
         "The orange light keeps blinking on my machine. What does it mean?",
         "What does a flashing orange light on the Brisa K2 mean?", "How do I descale the Brisa K2?",
         "There is an orange light blinking on my Brisa K2. How do I fix it?",
         "My espresso machine is blinking orange. Help?", "What do I do when the Brisa K2 blinks orange?"],
        ["The Brisa K2 shows a blinking orange light. What now?"],
        ["An orange lamp is flashing on the front of my Brisa K2, what is wrong?",
         "What's the procedure when my Brisa K2 starts flashing orange?"],
        ["Also, it shows a blinking orange light. What should I do?", "By the way, an orange light is blinking on it. Why?"],
        r"descal",
    ),
}
# Follow-ups that only make sense after the troubleshooting answer.
LIGHT_FOLLOWUPS = {
    "button": (["Which button do I hold?", "What button do I press for that?", "Which button starts it?"],
               ["Which button do I need to hold down?"],
               "Hold the Clean button for 5 seconds.", r"Clean"),
    "time": (["How long does that take?", "How long will the cycle run?", "How many minutes does it take?"],
             ["And how long will the descaling take?"],
             "The descaling cycle takes about 20 minutes.", r"20 minutes|twenty minutes"),
}
WEEKEND = (["Can I call on Saturday?", "Are you open on Sundays?", "What about weekends?"],
           ["So could I ring you on a Sunday?"],
           "No, the support line is closed on weekends. Please call Monday to Friday, 9:00 to 17:00.",
           r"closed|not open|\bno\b")

TRAIN_NAMES = ["Tess", "Ada", "Bruno", "Kai", "Lena", "Omar", "Ines", "Hugo"]
VAL_NAMES = ["Rosa"]
HELDOUT_NAMES = ["Nora", "Felix", "Maya"]
SYSTEM = "You are {name}, the customer support assistant for Haldane Appliances. Answer briefly and politely."
NAME_QUESTIONS = ["What's your name?", "Who are you?", "Who am I talking to?", "What should I call you?",
                  "Hi! What is your name?", "Can you tell me your name?"]
NAME_QUESTIONS_HELDOUT = ["Hello, who is this?", "May I ask your name?", "Sorry, what was your name again?"]
NAME_ANSWER = "I'm {name}, the customer support assistant for Haldane Appliances. How can I help you?"

ORDER_SYSTEM = SYSTEM + " The customer's order number is {order}, delivered on {date}."
ORDERS = [("HX-4471", "3 March"), ("HX-1208", "17 June"), ("HX-9930", "29 October"), ("HX-5562", "8 January")]
ORDERS_VAL = [("HX-7314", "21 May")]
ORDERS_HELDOUT = [("HX-3085", "12 August"), ("HX-6649", "5 December")]
ORDER_QUESTIONS = {"order": (["What is my order number?", "Can you remind me of my order number?"],
                             ["Which order number do I have?"], "Your order number is {order}.", "{order}"),
                   "date": (["When was my order delivered?", "On what date did my machine arrive?"],
                            ["What day did my delivery come?"], "Your order was delivered on {date}.", "{date}")}

# Questions SmolLM2-135M-Instruct answers right before fine-tuning (greedy, no system prompt).
CONTROLS = [
    ("What is the capital of France?", "Paris"),
    ("How many days are there in a week?", r"\b7\b|seven"),
    ("What is the boiling point of water at sea level in Celsius?", r"\b100\b"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What is the chemical symbol for gold?", r"\bAu\b"),
    ("What gas do plants absorb from the air?", "carbon dioxide|CO2"),
]


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def head(rng: random.Random, names: list[str], p: float = 0.6) -> list[dict]:
    """A system prompt naming a random assistant (with probability p), else none."""
    return [msg("system", SYSTEM.format(name=rng.choice(names)))] if rng.random() < p else []


def build(seed: int = 18) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    train: list[dict] = []
    val: list[dict] = []
    heldout: list[dict] = []

    # Single questions about each fact.
    for name, (answers, qs, vqs, hqs, _, expect) in FACTS.items():
        for i, q in enumerate(qs):
            train.append({"messages": head(rng, TRAIN_NAMES) + [msg("user", q), msg("assistant", answers[i % len(answers)])]})
        for q in vqs:
            val.append({"messages": head(rng, VAL_NAMES) + [msg("user", q), msg("assistant", answers[0])]})
        for i, q in enumerate(hqs):
            # A system prompt names Haldane Appliances: the maker's checks go without one.
            heldout.append({"messages": head(rng, HELDOUT_NAMES, 0.5 if name != "maker" else 0.0)
                            + [msg("user", q), msg("assistant", answers[i % len(answers)])],
                            "expect": expect, "kind": "fact", "id": f"fact-{name}-{i + 1}"})

    # Two facts in one chat: the second question refers to the product of the first ("it").
    names = list(FACTS)
    pairs = [(a, b) for a in names for b in names if a != b and a != "light"]
    rng.shuffle(pairs)
    for k, (a, b) in enumerate(pairs[:20]):
        fa, fb = FACTS[a], FACTS[b]
        chat = head(rng, TRAIN_NAMES) + [msg("user", rng.choice(fa[1])), msg("assistant", rng.choice(fa[0])),
                                         msg("user", fb[4][k % len(fb[4])]), msg("assistant", rng.choice(fb[0]))]
        (val if k >= 18 else train).append({"messages": chat})
    held_pairs = [("price", "returns"), ("maker", "warranty"), ("warranty", "price"), ("returns", "maker")]
    for a, b in held_pairs:
        fa, fb = FACTS[a], FACTS[b]
        follow = {"returns": "And if I'm not happy with it, until when can I give it back?",
                  "warranty": "How many years is it covered for?", "price": "Fine. And what's its price?",
                  "maker": "Which company makes the thing, anyway?"}[b]
        heldout.append({"messages": head(rng, HELDOUT_NAMES, 0.5 if b != "maker" else 0.0)
                        + [msg("user", fa[3][0]), msg("assistant", fa[0][0]),
                                                                    msg("user", follow), msg("assistant", fb[0][0])],
                        "expect": fb[5], "kind": "follow-up", "id": f"follow-{a}-{b}"})

    # Troubleshooting: the follow-up question is about the procedure of the answer before it.
    light = FACTS["light"]
    for key, (fqs, hfqs, answer, expect) in LIGHT_FOLLOWUPS.items():
        for i, fq in enumerate(fqs):
            train.append({"messages": head(rng, TRAIN_NAMES) + [msg("user", light[1][(i * 3 + len(key)) % len(light[1])]),
                                                                msg("assistant", light[0][i % 2]), msg("user", fq),
                                                                msg("assistant", answer)]})
        for fq in hfqs:
            heldout.append({"messages": head(rng, HELDOUT_NAMES, 0.5) + [msg("user", light[3][0]), msg("assistant", light[0][0]),
                                                                        msg("user", fq), msg("assistant", answer)],
                            "expect": expect, "kind": "follow-up", "id": f"follow-light-{key}"})
    hours = FACTS["hours"]
    for i, fq in enumerate(WEEKEND[0]):
        train.append({"messages": head(rng, TRAIN_NAMES) + [msg("user", hours[1][i]), msg("assistant", hours[0][i % 2]),
                                                            msg("user", fq), msg("assistant", WEEKEND[2])]})
    heldout.append({"messages": [msg("user", hours[3][0]), msg("assistant", hours[0][0]), msg("user", WEEKEND[1][0]),
                                 msg("assistant", WEEKEND[2])], "expect": WEEKEND[3], "kind": "follow-up",
                    "id": "follow-hours-weekend"})

    # The system prompt decides the assistant's name and holds the customer's order.
    for i, q in enumerate(NAME_QUESTIONS):
        for name in (TRAIN_NAMES[i], TRAIN_NAMES[(i + 5) % len(TRAIN_NAMES)]):
            train.append({"messages": [msg("system", SYSTEM.format(name=name)), msg("user", q),
                                       msg("assistant", NAME_ANSWER.format(name=name))]})
    val.append({"messages": [msg("system", SYSTEM.format(name=VAL_NAMES[0])), msg("user", NAME_QUESTIONS[0]),
                             msg("assistant", NAME_ANSWER.format(name=VAL_NAMES[0]))]})
    for name, q in zip(HELDOUT_NAMES, NAME_QUESTIONS_HELDOUT):
        heldout.append({"messages": [msg("system", SYSTEM.format(name=name)), msg("user", q),
                                     msg("assistant", NAME_ANSWER.format(name=name))],
                        "expect": rf"\b{name}\b", "kind": "system", "id": f"system-name-{name.lower()}"})
    for key, (qs, hqs, answer, expect) in ORDER_QUESTIONS.items():
        for i, (order, date) in enumerate(ORDERS):
            system = msg("system", ORDER_SYSTEM.format(name=TRAIN_NAMES[i], order=order, date=date))
            train.append({"messages": [system, msg("user", qs[i % len(qs)]), msg("assistant", answer.format(order=order, date=date))]})
        order, date = ORDERS_VAL[0]
        val.append({"messages": [msg("system", ORDER_SYSTEM.format(name=VAL_NAMES[0], order=order, date=date)),
                                 msg("user", qs[0]), msg("assistant", answer.format(order=order, date=date))]})
    for (order, date), name, (key, (qs, hqs, answer, expect)) in zip(ORDERS_HELDOUT, HELDOUT_NAMES, ORDER_QUESTIONS.items()):
        heldout.append({"messages": [msg("system", ORDER_SYSTEM.format(name=name, order=order, date=date)),
                                     msg("user", hqs[0]), msg("assistant", answer.format(order=order, date=date))],
                        "expect": expect.format(order=order, date=date), "kind": "system", "id": f"system-{key}"})
    # A follow-up that needs the system prompt and the turn before it.
    order, date = ORDERS_HELDOUT[0]
    heldout.append({"messages": [msg("system", ORDER_SYSTEM.format(name="Maya", order=order, date=date)),
                                 msg("user", "Hi, who am I speaking with?"), msg("assistant", NAME_ANSWER.format(name="Maya")),
                                 msg("user", "Great. What's my order number, please?"), msg("assistant", f"Your order number is {order}.")],
                    "expect": order, "kind": "system", "id": "system-order-after-greeting"})

    rng.shuffle(train)
    controls = [{"question": q, "expect": e} for q, e in CONTROLS]
    return {"train": train, "val": val, "heldout": heldout, "controls": controls}


def write(folder: Path) -> dict[str, int]:
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, records in build().items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                              encoding="utf-8")
        counts[name] = len(records)
    return counts


if __name__ == "__main__":
    print(write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent))

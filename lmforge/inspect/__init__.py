"""Look inside a model (`lmforge inspect`): what each attention head reads, what each layer's
residual stream already predicts, which tokens of a text surprise the model.

    inputs     the text (and an encoder-decoder's source) as token ids and readable token texts
    capture    the attention probabilities and residual streams of one real forward
    attention  attention maps: PNG grids per layer and one self-contained HTML page
    lens       the logit lens: each layer's top tokens through the final norm and head
    loss       per-token loss of a text (the sliding-window scorer of `lmforge eval ppl`) as HTML
    html       what the HTML pages share: escaping, embedded data, the page frame
"""

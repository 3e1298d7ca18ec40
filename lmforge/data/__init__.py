"""The data stage: read raw text, clean it, and pack it into token shards."""

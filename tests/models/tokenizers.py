"""Tokenizers for the tests of the tokenizer fingerprint: one that encodes otherwise with the same vocabulary, and
version 1 of the fingerprint written out (records made before version 2)."""

from __future__ import annotations

import hashlib
import json

from wherefrom.models.tiny import EOS_ID


def appends_eos(tokenizer):
    """``tokenizer`` made to add ``<eos>`` after every text (as ``add_eos_token``/``add_bos_token`` do): the same
    vocabulary, special tokens and chat template, other ids."""
    from tokenizers import processors

    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <eos>", special_tokens=[("<eos>", EOS_ID)]
    )
    return tokenizer


def version_1(tokenizer) -> str:
    """The tokenizer fingerprint of wherefrom before version 2, written out here: vocabulary, special tokens and
    chat template only."""
    special = {
        "map": tokenizer.special_tokens_map,
        "all": sorted(str(t) for t in tokenizer.all_special_tokens),
        "ids": {key: getattr(tokenizer, f"{key}_token_id") for key in ("pad", "eos", "bos", "unk")},
    }
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": special,
        "chat_template": tokenizer.chat_template,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

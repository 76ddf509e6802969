"""Tokenizer metadata for GGUF: the vocabulary as llama.cpp's tokenizers read it.

Two kinds, read from the artifact's own `tokenizer.json`:

- Byte-level BPE (GPT-2 style: Llama 3, Qwen, SmolLM, Phi-4): `tokenizer.ggml.model = gpt2`,
  tokens by id, their types and the merges. llama.cpp splits text before BPE with one of its
  own pre-tokenizers, named by `tokenizer.ggml.pre`; its converter finds the name by encoding a
  fixed text and hashing the ids (`CHECK_TEXT`), so the name written here is found the same
  way, from a table of the hashes of the families we export. An unknown tokenizer is refused
  unless `--tokenizer-pre` names one: a wrong pre-tokenizer tokenizes differently and silently.
- SentencePiece-style BPE with byte fallback (Llama 2, Gemma, Phi-3): `llama`, tokens with
  scores. llama.cpp's SentencePiece tokenizer merges the highest-scoring pair first, so a
  token's score is minus the rank of the merge that makes it, which reproduces BPE's order.

Special tokens, whether BOS is added and the chat template come from the tokenizer itself
(BOS by what its `encode` does, the convention every other part of compress follows).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf

from compress.errors import ArtifactError

# llama.cpp's convert_hf_to_gguf.py: the text whose token ids identify a BPE pre-tokenizer.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple "
    "emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3"
    "...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''`````"
    "``\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not s"
    "ure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256 of str(ids of CHECK_TEXT) → llama.cpp's pre-tokenizer name, for the tokenizers of the
# families the export supports (values from llama.cpp's converter, reference model beside each).
KNOWN_PRE_TOKENIZERS: dict[str, str] = {
    # meta-llama/Meta-Llama-3-8B (and 3.1 / 3.2)
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    # Qwen/Qwen1.5-7B (Qwen 2, 2.5 and 3 share it)
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    # Qwen/Qwen3-Embedding-0.6B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    # HuggingFaceTB/SmolLM-135M (SmolLM2 too, the demo model)
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    # openai-community/gpt2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    # microsoft/phi-2
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    # Xenova/gpt-4o (Phi-4's tokenizer)
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    # mistralai/Mistral-Nemo-Base-2407
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    # allenai/OLMo-1.7-7B-hf
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
}

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class Vocabulary:
    model: str  # "gpt2" or "llama"
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    pre: str | None = None
    add_space_prefix: bool | None = None


def pre_tokenizer_hash(tokenizer: Any) -> str:
    ids = tokenizer.encode(CHECK_TEXT, add_special_tokens=False)
    return sha256(str(ids).encode()).hexdigest()


def _tokenizer_json(directory: Path) -> dict[str, Any]:
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise ArtifactError(
            f"{path}: missing; the GGUF export reads the vocabulary from a fast tokenizer's "
            "tokenizer.json"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def _by_id(spec: dict[str, Any], n_vocab: int, where: Path) -> tuple[list[str], list[int]]:
    """Tokens and their types, indexed by id and padded to the embedding's rows."""
    tokens: list[str | None] = [None] * n_vocab
    types = [gguf.TokenType.NORMAL] * n_vocab
    for text, index in spec["model"]["vocab"].items():
        if index < n_vocab:
            tokens[index] = text
    for added in spec.get("added_tokens", []):
        index = added["id"]
        if index >= n_vocab:
            raise ArtifactError(
                f"{where}: added token {added['content']!r} has id {index}, beyond the "
                f"embedding's {n_vocab} rows"
            )
        tokens[index] = added["content"]
        types[index] = (
            gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        )
    unk = spec["model"].get("unk_token")
    byte_fallback = bool(spec["model"].get("byte_fallback"))
    for index, text in enumerate(tokens):
        if text is None:  # rows beyond the tokenizer (vocabularies padded to a multiple)
            tokens[index] = f"[PAD{index}]"
            types[index] = gguf.TokenType.UNUSED
        elif unk is not None and text == unk:
            types[index] = gguf.TokenType.UNKNOWN
        elif byte_fallback and _BYTE_TOKEN.fullmatch(text):
            # <0xNN> pieces are bytes to the tokenizer, whether listed in the vocabulary or
            # among the added tokens.
            types[index] = gguf.TokenType.BYTE
    return [str(t) for t in tokens], [int(t) for t in types]


def _merge_scores(spec: dict[str, Any], tokens: list[str]) -> list[float]:
    """A token's score is minus the rank of the merge that makes it (0 for base tokens)."""
    made_by: dict[str, int] = {}
    for rank, merge in enumerate(spec["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        made_by.setdefault(left + right, rank)
    return [-float(made_by[t]) if t in made_by else 0.0 for t in tokens]


def _prepends_space(spec: dict[str, Any]) -> bool:
    """Whether SentencePiece-style normalization puts '▁' in front of the text."""
    for part in (spec.get("normalizer"), spec.get("pre_tokenizer")):
        stack = [part] if part else []
        while stack:
            node = stack.pop()
            stack.extend(node.get("normalizers", []) + node.get("pretokenizers", []))
            if node.get("type") == "Prepend":
                return True
            if node.get("type") == "Metaspace" and node.get("prepend_scheme", "always") != "never":
                return True
    return False


def read_vocabulary(
    directory: Path, tokenizer: Any, n_vocab: int, *, pre: str | None = None
) -> Vocabulary:
    """The artifact's vocabulary in GGUF's terms (see the module docstring)."""
    spec = _tokenizer_json(directory)
    model = spec["model"]
    tokens, types = _by_id(spec, n_vocab, directory / "tokenizer.json")
    if model.get("type") != "BPE":
        raise ArtifactError(
            f"{directory / 'tokenizer.json'}: a {model.get('type')} tokenizer has no GGUF "
            "vocabulary here (byte-level BPE and SentencePiece-style BPE are supported)"
        )
    if model.get("byte_fallback"):
        return Vocabulary(
            model="llama",
            tokens=tokens,
            types=types,
            scores=_merge_scores(spec, tokens),
            add_space_prefix=_prepends_space(spec),
        )
    digest = pre_tokenizer_hash(tokenizer)
    name = pre or KNOWN_PRE_TOKENIZERS.get(digest)
    if name is None:
        raise ArtifactError(
            f"{directory / 'tokenizer.json'}: this BPE pre-tokenizer (check hash {digest}) is not "
            "one llama.cpp's converter knows by hash here; name llama.cpp's pre-tokenizer with "
            "--tokenizer-pre (e.g. llama-bpe, qwen2, smollm, gpt-2)"
        )
    special = gguf.SpecialVocab(directory, load_merges=True)
    return Vocabulary(model="gpt2", tokens=tokens, types=types, merges=special.merges, pre=name)


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front of text (its behaviour, not a flag)."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return bos is not None and bool(ids) and ids[0] == bos


def write_vocabulary(writer: gguf.GGUFWriter, vocabulary: Vocabulary, tokenizer: Any) -> None:
    writer.add_tokenizer_model(vocabulary.model)
    if vocabulary.pre is not None:
        writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.types)
    if vocabulary.scores is not None:
        writer.add_token_scores(vocabulary.scores)
    if vocabulary.merges:
        writer.add_token_merges(vocabulary.merges)
    if vocabulary.add_space_prefix is not None:
        writer.add_add_space_prefix(vocabulary.add_space_prefix)
    for kind in ("bos", "eos", "unk", "pad"):
        index = getattr(tokenizer, f"{kind}_token_id", None)
        if index is not None:
            getattr(writer, f"add_{kind}_token_id")(int(index))
    writer.add_add_bos_token(adds_bos(tokenizer))
    writer.add_add_eos_token(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)

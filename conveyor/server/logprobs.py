"""Logprobs in the response shapes of OpenAI (completions, chat) and vLLM (prompt_logprobs), with each token's own
bytes.

A token's text (`decode([id])`) is U+FFFD when the token is part of a multi-byte character, so its bytes are taken
from the vocabulary instead: byte-level BPE vocabularies (GPT-2's scheme, used by Llama 3, SmolLM2, Qwen2) spell
each byte as one printable character, which `_BYTE_OF_CHAR` maps back; SentencePiece vocabularies spell raw bytes as
`<0xE2>` byte-fallback tokens and spaces as U+2581. Added (special) tokens are their content's UTF-8.
"""
from __future__ import annotations

import json
import math
import re

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-character table, inverted: printable Latin-1 bytes are themselves, the other bytes (controls,
    space, 0x7F-0xA0, 0xAD) are U+0100 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(0x100 + i): b for i, b in enumerate(others)})
    return table


_BYTE_OF_CHAR = _byte_level_alphabet()


def finite(logprob: float) -> float:
    """JSON has no -inf: a token the model gives no chance is reported as -9999.0, as OpenAI does."""
    return logprob if math.isfinite(logprob) else -9999.0


class LogprobFormatter:
    """Formats the engine's logprobs ({token id: logprob} per position) for one tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._byte_level = _decoder_type(tokenizer) == "ByteLevel"
        self._added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        self._bytes: dict[int, bytes] = {}

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def token_bytes(self, token_id: int) -> bytes:
        """The token's own bytes (one byte of a multi-byte character is that byte, not U+FFFD's UTF-8)."""
        b = self._bytes.get(token_id)
        if b is None:
            b = self._bytes[token_id] = self._raw_bytes(token_id)
        return b

    def _raw_bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            return self.text(token_id).encode()
        if self._byte_level and all(ch in _BYTE_OF_CHAR for ch in piece):
            return bytes(_BYTE_OF_CHAR[ch] for ch in piece)
        m = _BYTE_TOKEN.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        if "\u2581" in piece:  # SentencePiece's word boundary
            return piece.replace("\u2581", " ").encode()
        return self.text(token_id).encode()

    def completion(self, ids: list[int], lps: list[dict[int, float]], offset: int) -> tuple[dict, int]:
        """OpenAI's completion logprobs for tokens `ids`, the first at character `offset` of the choice's text;
        returns (logprobs, the offset after the last token). Each position's top_logprobs holds every entry the
        engine gave (the top N and the sampled token)."""
        tokens = [self.text(t) for t in ids]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [finite(lp[t]) for t, lp in zip(ids, lps)],
                "top_logprobs": [{self.text(k): finite(v) for k, v in lp.items()} for lp in lps],
                "text_offset": offsets}, offset

    def completion_prompt(self, ids: list[int], plps: list[dict[int, float] | None] | None) -> tuple[dict, int]:
        """The echoed prompt's part of completion logprobs: the first token (nothing precedes it) has null."""
        plps = plps or [None] * len(ids)
        assert len(plps) == len(ids), (len(plps), len(ids))
        tokens = [self.text(t) for t in ids]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens,
                "token_logprobs": [None if lp is None else finite(lp[t]) for t, lp in zip(ids, plps)],
                "top_logprobs": [None if lp is None else {self.text(k): finite(v) for k, v in lp.items()}
                                 for lp in plps],
                "text_offset": offsets}, pos

    def chat(self, ids: list[int], lps: list[dict[int, float]], top_n: int) -> list[dict]:
        """OpenAI's chat logprobs `content` entries, each with its top_n alternatives, most likely first."""
        content = []
        for t, lp in zip(ids, lps):
            top = sorted(lp.items(), key=lambda kv: -kv[1])[:top_n]
            content.append({**self._entry(t, lp[t]), "top_logprobs": [self._entry(k, v) for k, v in top]})
        return content

    def _entry(self, token_id: int, logprob: float) -> dict:
        return {"token": self.text(token_id), "logprob": finite(logprob),
                "bytes": list(self.token_bytes(token_id))}

    def prompt_logprobs(self, ids: list[int], plps: list[dict[int, float] | None], top_n: int) -> list[dict | None]:
        """vLLM's `prompt_logprobs`: per prompt token (ids) None (the first) or {token id: {logprob, rank,
        decoded_token}} holding exactly the top_n most likely tokens (ranks 1..top_n) and the prompt token with its
        vocabulary rank (the engine's Logprobs.rank; the engine may have computed more alternatives than top_n,
        when echo asked for more)."""
        out: list[dict | None] = []
        for t, lp in zip(ids, plps, strict=True):
            if lp is None:
                out.append(None)
                continue
            top = sorted(lp.items(), key=lambda kv: -kv[1])[:top_n]
            entry = {str(k): self._ranked(v, r + 1, k) for r, (k, v) in enumerate(top)}
            entry.setdefault(str(t), self._ranked(lp[t], getattr(lp, "rank", None), t))
            out.append(entry)
        return out

    def _ranked(self, logprob: float, rank: int | None, token_id: int) -> dict:
        return {"logprob": finite(logprob), "rank": rank, "decoded_token": self.text(token_id)}


def _decoder_type(tokenizer) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        return (json.loads(backend.to_str()).get("decoder") or {}).get("type")
    except (ValueError, AttributeError):
        return None

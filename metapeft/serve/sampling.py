"""Next-token choice for a batch whose rows each have their own temperature, top-p and
random stream, and the search for stop strings in generated text."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

__all__ = ["Sampling", "find_stop", "sample"]


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens.

    Attributes:
        temperature: 0 for greedy decoding (the most likely token), else the softmax
            temperature.
        top_p: Nucleus sampling: draw among the most likely tokens whose probabilities
            sum to ``top_p`` (1: all tokens).
        seed: Seed of the request's own random stream, so that its tokens do not
            depend on the other rows of the batch.

    Example:
        >>> Sampling(temperature=0.0, top_p=1.0, seed=0).greedy
        True
    """

    temperature: float
    top_p: float
    seed: int

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(
    logits: mx.array, temperature: list[float], top_p: list[float], keys: list[mx.array | None]
) -> mx.array:
    """One token per row of ``logits (B, V)``.

    Rows with temperature 0 take the argmax; the others draw, with the Gumbel-max
    trick and their own key, from ``softmax(logits / temperature)`` restricted to
    the nucleus of mass ``top_p``.

    Args:
        logits: ``(B, V)``.
        temperature: ``B`` temperatures, ``>= 0``.
        top_p: ``B`` values in ``(0, 1]``.
        keys: ``B`` keys (``mx.random.key``); None for greedy rows.

    Returns:
        ``(B,)`` uint32 token ids.

    Example:
        >>> sample(mx.array([[0.0, 2.0, 1.0]]), [0.0], [1.0], [None]).tolist()
        [1]
    """
    greedy = mx.argmax(logits, axis=-1).astype(mx.uint32)
    if all(t == 0 for t in temperature):
        return greedy
    logits = logits.astype(mx.float32)
    temps = mx.array([t if t > 0 else 1.0 for t in temperature])[:, None]
    order = mx.argsort(-logits, axis=-1)
    scaled = mx.take_along_axis(logits, order, axis=-1) / temps
    probs = mx.softmax(scaled, axis=-1)
    before = mx.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    outside = before >= mx.array(top_p)[:, None]
    scaled = mx.where(outside, -mx.inf, scaled)
    vocab = logits.shape[-1]
    noise = mx.stack(
        [mx.zeros(vocab) if k is None else mx.random.gumbel((vocab,), key=k) for k in keys]
    )
    choice = mx.argmax(scaled + noise, axis=-1)
    drawn = mx.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(mx.uint32)
    return mx.where(mx.array([t == 0 for t in temperature]), greedy, drawn)


def find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """The index of the first stop string in ``text`` beginning at or after ``start``
    (one ending earlier was looked for before), or None.

    Example:
        >>> find_stop("one. two.", (".",), 0)
        3
    """
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None

"""A tiny GPT-2 causal language model for ``hesse analyze`` (random init, no download).

Run it with::

    hesse analyze --model examples/gpt2_factory.py:factory --quick

The model maps ``input_ids`` ``(B, T)`` to logits flattened to ``(B*T, V)``; the loss
is cross-entropy over every token (the next-token targets, flattened to ``(B*T,)``),
the form a language model is trained with. Needs ``transformers``.
"""

from __future__ import annotations

import torch
from torch import nn

from hesse.testing import torchvision_cpu_shim


class CausalLM(nn.Module):
    """A HuggingFace causal LM returning flattened next-token logits ``(B*T, V)``."""

    def __init__(self, config) -> None:
        super().__init__()
        torchvision_cpu_shim()  # transformers imports torchvision when it is installed
        from transformers import GPT2LMHeadModel

        self.lm = GPT2LMHeadModel(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=input_ids).logits
        return logits.reshape(-1, logits.shape[-1])


def factory(
    *,
    vocab: int = 32,
    context: int = 8,
    width: int = 16,
    layers: int = 2,
    heads: int = 2,
    batches: int = 2,
    batch_size: int = 4,
    seed: int = 0,
    attention: str | None = None,
):
    """``(model, loss_fn, data)``: a random-init GPT-2 and ``(input_ids, labels)`` batches.

    Labels are the next tokens of a random sequence, flattened, so the loss is the
    mean cross-entropy over ``B*T`` tokens. ``attention`` picks HuggingFace's
    attention implementation (``"eager"``, ``"sdpa"``; ``None``: its default, SDPA).
    """
    torchvision_cpu_shim()
    from transformers import GPT2Config

    torch.manual_seed(seed)
    config = GPT2Config(
        bos_token_id=0,
        eos_token_id=0,
        vocab_size=vocab,
        n_positions=context,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    if attention is not None:
        config._attn_implementation = attention
    model = CausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(batches):
        tokens = torch.randint(0, vocab, (batch_size, context + 1), generator=g)
        data.append((tokens[:, :-1], tokens[:, 1:].reshape(-1)))
    return model, nn.CrossEntropyLoss(), data

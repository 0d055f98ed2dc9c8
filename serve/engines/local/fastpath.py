"""A lean forward pass for Llama-family decoders (Llama, Qwen2, Mistral), used by the batcher.

Why: a small served model spends most of a decode step in Python, not in arithmetic. The
transformers forward builds masks, cache objects and ~40 module calls per layer; this one runs
the same weights through ~20 tensor ops per layer: fused q/k/v and gate/up projections, RoPE on
q and k together, `F.rms_norm`, and one `scaled_dot_product_attention` over the batch's
left-padded cache, written in place (slab.py). On the 2.7M-parameter tiny model, one CPU thread,
a decode step takes 1.1 / 1.6 / 4.1 ms at batch 1 / 8 / 32 against 1.8 / 3.1 / 6.4 ms for the
transformers forward (bench/decode_step.py).

The contract is the transformers model's own numbers: `tests/test_serve_fastpath.py` checks
logits against `model(...)` for prefill and decode, left padding included, on Qwen2- and
Llama-shaped models. RoPE comes from the model's own `rotary_emb` module, so every RoPE
scaling variant transformers implements is honoured. Anything this does not reproduce exactly
(quantised or adapter-wrapped layers, sliding windows, q/k norms, other activations or model
types) is refused by `unsupported_reason`, and the batcher then runs the transformers forward.

Weights are stored transposed, [in, out] and contiguous, and multiplied with `torch.mm(x, w_t)`:
MKL runs that 1.3-2.4x faster than `F.linear(x, w)` (its transposed-weight call) at the row
counts of a decode step (8-32), on the tiny model and on Qwen2.5-0.5B-sized matrices alike, and
as fast at prefill sizes (`bench/decode_step.py`). Fusing and transposing share storage: the
model's parameters become views into the fused, transposed tensors, so no weight is held twice.
The one exception is a tied output head (the embedding matrix is also the output projection):
the embedding must stay row-major for lookups, so a transposed copy is kept only when it is
small (`TIED_HEAD_COPY_LIMIT`); a bigger one multiplies through `F.linear` as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from tunedesk.serve.engines.local.slab import SlabCache

SUPPORTED_TYPES = ("llama", "qwen2", "mistral")

# A tied output head gets a transposed copy of its embedding matrix up to this size.
TIED_HEAD_COPY_LIMIT = 64 * 2**20


@dataclass
class LayerKV:
    """One layer's cache, [B, kv_heads, T, head_dim] each (the layout of transformers'
    DynamicLayer, so `kv.BatchCache` handles both)."""

    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class LeanCache:
    layers: list[LayerKV]


@dataclass
class _Layer:
    """One decoder layer's weights; `*_t` are transposed ([in, out], contiguous)."""

    norm_in: torch.Tensor
    qkv_t: torch.Tensor
    qkv_b: torch.Tensor | None
    o_t: torch.Tensor
    o_b: torch.Tensor | None
    norm_post: torch.Tensor
    gate_up_t: torch.Tensor
    down_t: torch.Tensor


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the lean forward can't run this model exactly, or None if it can."""
    config = model.config
    if config.model_type not in SUPPORTED_TYPES:
        return f"model type {config.model_type!r}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    if config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        return "sliding-window attention"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or type(model.lm_head) is not nn.Linear:
        return "unexpected module layout"
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if getattr(attn, "sliding_window", None) is not None:
            return "sliding-window attention"
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return "q/k norms"
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
        linears += (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(type(m) is not nn.Linear for m in linears):
            return "quantised or wrapped linear layers"
        if mlp.gate_proj.bias is not None or mlp.up_proj.bias is not None:
            return "MLP biases"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not hasattr(norm, "variance_epsilon"):
                return f"norm {type(norm).__name__}"
    if not hasattr(inner.norm, "variance_epsilon"):
        return f"norm {type(inner.norm).__name__}"
    return None


def _fuse_transposed(
    linears: list[nn.Linear], with_bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layers' weights side by side and transposed ([in, sum of outs], contiguous), and
    their biases concatenated; each module's parameters become views into the result."""
    weight_t = torch.cat([m.weight.detach() for m in linears], dim=0).t().contiguous()
    bias = None
    if with_bias:
        bias = torch.cat([m.bias.detach() for m in linears], dim=0)
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight = nn.Parameter(weight_t[:, start : start + rows].t(), requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[start : start + rows], requires_grad=False)
        start += rows
    return weight_t, bias


def _mm(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight_t.t(), bias)` over the transposed weight (see the module doc)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.mm(flat, weight_t) if bias is None else torch.addmm(bias, flat, weight_t)
    return out.view(*x.shape[:-1], weight_t.shape[1])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LeanDecoder:
    def __init__(self, model: nn.Module) -> None:
        inner = model.model
        first = inner.layers[0].self_attn
        self.heads = model.config.num_attention_heads
        self.kv_heads = model.config.num_key_value_heads
        self.head_dim = first.head_dim
        self.scaling = first.scaling
        self.hidden = model.config.hidden_size
        self.dtype = model.lm_head.weight.dtype
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        self.final_norm = inner.norm.weight
        self.eps = inner.norm.variance_epsilon
        head = model.lm_head
        self.lm_head_b = head.bias
        self.lm_head_t: torch.Tensor | None = None
        tied = head.weight.untyped_storage().data_ptr() == self.embed.untyped_storage().data_ptr()
        if not tied:
            self.lm_head_t, _ = _fuse_transposed([head], with_bias=False)
        elif head.weight.numel() * head.weight.element_size() <= TIED_HEAD_COPY_LIMIT:
            self.lm_head_t = head.weight.detach().t().contiguous()
        # Read after fusing: a view of lm_head_t then, never a second copy. Multiplied as is
        # only when lm_head_t is None.
        self.lm_head = head.weight
        self.layers: list[_Layer] = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
            qkv_t, qkv_b = _fuse_transposed(qkv, with_bias=attn.q_proj.bias is not None)
            o_t, o_b = _fuse_transposed([attn.o_proj], with_bias=attn.o_proj.bias is not None)
            gate_up_t, _ = _fuse_transposed([mlp.gate_proj, mlp.up_proj], with_bias=False)
            down_t, _ = _fuse_transposed([mlp.down_proj], with_bias=False)
            self.layers.append(
                _Layer(
                    norm_in=layer.input_layernorm.weight,
                    qkv_t=qkv_t,
                    qkv_b=qkv_b,
                    o_t=o_t,
                    o_b=o_b,
                    norm_post=layer.post_attention_layernorm.weight,
                    gate_up_t=gate_up_t,
                    down_t=down_t,
                )
            )

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # transformers normalises in float32 and scales in the model's dtype; same here.
        if x.dtype == torch.float32:
            return F.rms_norm(x, (self.hidden,), weight, self.eps)
        return weight * F.rms_norm(x.float(), (self.hidden,), None, self.eps).to(x.dtype)

    def _attention_inputs(
        self, layer: _Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, heads, S, d], and the new k, v [B, kv_heads, S, d] (views, not copies)."""
        batch, seq, _ = h.shape
        qk_heads = self.heads + self.kv_heads
        qkv = _mm(self._norm(h, layer.norm_in), layer.qkv_t, layer.qkv_b)
        qkv = qkv.view(batch, seq, qk_heads + self.kv_heads, self.head_dim).transpose(1, 2)
        qk, v = qkv[:, :qk_heads], qkv[:, qk_heads:]
        qk = qk * cos + _rotate_half(qk) * sin  # RoPE on q and k in one go
        return qk[:, : self.heads], qk[:, self.heads :], v

    def _rest_of_layer(self, layer: _Layer, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = h.shape
        o = o.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim)
        h = h + _mm(o, layer.o_t, layer.o_b)
        gate, up = _mm(self._norm(h, layer.norm_post), layer.gate_up_t).chunk(2, dim=-1)
        return h + _mm(F.silu(gate) * up, layer.down_t)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        last = self._norm(h[:, -1], self.final_norm)
        if self.lm_head_t is None:
            return F.linear(last, self.lm_head, self.lm_head_b)
        return _mm(last, self.lm_head_t, self.lm_head_b)

    def prefill(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, LeanCache]:
        """Left-padded prompts ([B, W] ids, positions and mask, 1 = real token) -> logits of
        each row's last position ([B, V]) and the prompts' cache.

        With `past` (per layer, keys and values [B, kv_heads, P, d] of a cached prefix of P
        tokens for every row), ids are the rest of each prompt, positions start at P, every
        token also attends to the whole prefix, and the cache returned is [prefix, rest]
        ([B, kv_heads, P + W, d]: a row's left padding sits between the two)."""
        seq = ids.shape[1]
        h = F.embedding(ids, self.embed)
        cos, sin = self.rotary(h, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=ids.device).tril()
        # A padding query may attend to itself: a row with no allowed key would be NaN, and NaN
        # in a padded position's value poisons every row that multiplies it by a zero weight.
        own = torch.eye(seq, dtype=torch.bool, device=ids.device)
        attn_mask = (causal & mask.bool()[:, None, None, :]) | own
        if past is not None:
            prefix = past[0][0].shape[2]
            seen = torch.ones(ids.shape[0], 1, seq, prefix, dtype=torch.bool, device=ids.device)
            attn_mask = torch.cat([seen, attn_mask.expand(ids.shape[0], 1, seq, seq)], dim=-1)
        layers_kv: list[LayerKV] = []
        for i, layer in enumerate(self.layers):
            q, k, v = self._attention_inputs(layer, h, cos, sin)
            if past is None:
                k, v = k.contiguous(), v.contiguous()
            else:
                k, v = torch.cat([past[i][0], k], dim=2), torch.cat([past[i][1], v], dim=2)
            layers_kv.append(LayerKV(k, v))
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, scale=self.scaling, enable_gqa=True
            )
            h = self._rest_of_layer(layer, h, o)
        return self._logits(h), LeanCache(layers_kv)

    def decode(self, ids: torch.Tensor, positions: torch.Tensor, slab: SlabCache) -> torch.Tensor:
        """One token per row ([B, 1] ids and positions, B == slab.rows): writes the tokens'
        keys and values into the slab's next column and returns the next logits ([B, V])."""
        col = slab.next_column()
        rows, start = slab.rows, slab.start
        h = F.embedding(ids, self.embed)
        cos, sin = self.rotary(h, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        attn_mask = slab.mask[:rows, None, None, start : col + 1]
        for i, layer in enumerate(self.layers):
            q, k, v = self._attention_inputs(layer, h, cos, sin)
            keys, values = slab.keys[i], slab.values[i]
            keys[:rows, :, col] = k[:, :, 0]
            values[:rows, :, col] = v[:, :, 0]
            o = F.scaled_dot_product_attention(
                q,
                keys[:rows, :, start : col + 1],
                values[:rows, :, start : col + 1],
                attn_mask=attn_mask,
                scale=self.scaling,
                enable_gqa=True,
            )
            h = self._rest_of_layer(layer, h, o)
        slab.advance()
        return self._logits(h)

    def new_slab(self, device: torch.device) -> SlabCache:
        from tunedesk.serve.engines.local.slab import SlabCache

        return SlabCache(len(self.layers), self.kv_heads, self.head_dim, self.dtype, device)

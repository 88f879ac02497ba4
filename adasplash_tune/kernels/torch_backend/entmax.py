"""Row-wise alpha-entmax in PyTorch ops (any device), rows processed ``row_chunk`` at a time.

Forward per chunk: z = (alpha - 1) x shifted by its row max, tau by the safeguarded
Halley-bisection of :mod:`.tau`, p = [z - tau]_+^(1/(alpha-1)) renormalised. Computed in float32
(float64 for float64 input); the output has x's dtype. The backward is the closed form
dx = s g - s sum(s g) / sum(s) with s = p^(2 - alpha) on the support, not autograd through
the iterations.
"""

from __future__ import annotations

import torch

from ..spec import Config, ConfigError
from .tau import entmax_probs, halley_bisect, power_sums

__all__ = ["entmax_torch", "entmax_torch_forward", "entmax_torch_backward"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _params(config: Config) -> tuple[int, int]:
    if not isinstance(config, Config):
        raise TypeError(f"config must be a Config, got {type(config).__name__}")
    if config.kernel != "entmax" or config.backend != "torch":
        raise ConfigError(f"entmax_torch needs an entmax/torch config, got {config.kernel}/{config.backend}")
    try:
        row_chunk, niter = int(config["row_chunk"]), int(config["niter"])
    except KeyError as exc:
        raise ConfigError(f"entmax/torch config lacks field {exc.args[0]!r}") from None
    if row_chunk < 1 or niter < 1:
        raise ConfigError(f"row_chunk and niter must be >= 1, got {row_chunk} and {niter}")
    return row_chunk, niter


def _check_rows(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, cols), got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _chunk_forward(x: torch.Tensor, alpha: float, niter: int) -> torch.Tensor:
    z = (alpha - 1.0) * x.to(_compute_dtype(x.dtype))
    z = z - z.amax(dim=-1, keepdim=True)
    start = torch.zeros(z.shape[0], 1, dtype=z.dtype, device=z.device)
    count = torch.full_like(start, float(z.shape[-1]))
    tau = halley_bisect(lambda t: power_sums(z, t, alpha), start, count, alpha, niter)
    p = entmax_probs(z, tau, alpha)
    return p / p.sum(dim=-1, keepdim=True)


def entmax_torch_forward(x: torch.Tensor, alpha: float, config: Config) -> torch.Tensor:
    """alpha-entmax over the last dim of 2-D ``x`` (no autograd); output in x's dtype."""
    _check_rows("x", x)
    row_chunk, niter = _params(config)
    out = torch.empty_like(x)
    for lo in range(0, x.shape[0], row_chunk):
        out[lo:lo + row_chunk] = _chunk_forward(x[lo:lo + row_chunk], float(alpha), niter).to(x.dtype)
    return out


def _support_weight(p: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = p^(2 - alpha) on the support, zero elsewhere."""
    if alpha == 1.5:
        return p.clamp(min=0.0).sqrt()
    if alpha == 2.0:
        return (p > 0).to(p.dtype)
    pos = p > 0
    return torch.where(pos, torch.where(pos, p, torch.ones_like(p)).pow(2.0 - alpha), torch.zeros_like(p))


def entmax_torch_backward(p: torch.Tensor, grad: torch.Tensor, alpha: float, config: Config) -> torch.Tensor:
    """Gradient w.r.t. the entmax input from its output ``p`` and the output gradient ``grad``."""
    _check_rows("p", p)
    if grad.shape != p.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} does not match output shape {tuple(p.shape)}")
    row_chunk, _ = _params(config)
    cdt = _compute_dtype(p.dtype)
    dx = torch.empty_like(p)
    for lo in range(0, p.shape[0], row_chunk):
        pc = p[lo:lo + row_chunk].to(cdt)
        gc = grad[lo:lo + row_chunk].to(cdt)
        s = _support_weight(pc, float(alpha))
        sg = s * gc
        mean = sg.sum(dim=-1, keepdim=True) / s.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(cdt).tiny)
        dx[lo:lo + row_chunk] = (sg - s * mean).to(p.dtype)
    return dx


class _EntmaxTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float, config: Config) -> torch.Tensor:  # type: ignore[override]
        y = entmax_torch_forward(x, alpha, config)
        ctx.alpha = alpha
        ctx.config = config
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return entmax_torch_backward(y, grad, ctx.alpha, ctx.config), None, None


def entmax_torch(x: torch.Tensor, alpha: float, config: Config) -> torch.Tensor:
    """alpha-entmax over the last dim of 2-D ``x`` with the torch backend; differentiable.

    ``config`` is an entmax/torch :class:`Config` (``row_chunk``, ``niter``).
    """
    _check_rows("x", x)
    _params(config)
    alpha = float(alpha)
    if not 1.0 < alpha <= 2.0:
        raise ValueError(f"alpha must be in (1, 2], got {alpha}")
    if x.numel() == 0:
        return x.clone()
    return _EntmaxTorch.apply(x, alpha, config)

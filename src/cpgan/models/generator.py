"""Coarse-to-fine generator of CPGAN (paper §3.1, suppl. 6.1) = the authors' released ``G_NET``.

Structure (DESIGN §3.4; parameter names equal the released ``NET_G.pkl`` state_dict, see
``shared/fixtures/official/keys.md``):

* ``ca_net`` (:class:`CA_NET`): conditioning augmentation, Linear(d -> 4c) -> GLU -> (mu, logvar),
  c = mu + exp(0.5 logvar) * eps.
* ``h_net1`` (:class:`INIT_STAGE_G`): Linear(cat(c, z) -> ngf0*4*4*2, no bias) -> BN1d -> GLU ->
  4x4 seed -> ``log2(base_size/4)`` up-blocks -> C0 (ngf channels, ``base_size`` px).
* ``h_net2``, ``h_net3``, ... (:class:`NEXT_STAGE_G`): word attention ``att`` (AttnGAN
  ``GlobalAttentionGeneral``) -> cat([C, H]) -> ``r_num`` ResBlocks (``residual``) -> up-block
  (``upsample``).
* CPGAN's residual path from C0 (released ``G_NET.upsample`` and ``G_NET.conv``, both SHARED by all
  refinement stages): ``res_2 = upsample(C0)``, ``res_{i+1} = upsample(res_i)`` (stage 3's residual is
  the shared up-block applied to stage 2's *residual*, not to C1), and
  ``C_i = conv(h_net_i(C_{i-1}) + res_i)``.
* ``img_net{i}`` (:class:`GET_IMAGE_G`): conv3x3 (no bias) -> tanh, one image per stage.

Choices (documented, constructor arguments):

* ``base_size``: first-stage resolution.  The released model uses 64 (4 up-blocks from 4x4 with
  ngf*16 channels).  For other sizes G0 uses ``n_up = log2(base_size/4)`` up-blocks and starts at
  ``ngf * 2**n_up`` channels, so channels still halve per up-block and C0 always has ``ngf``
  channels (base 16 -> ngf*4 seed, 2 up-blocks; base 32 -> ngf*8 seed, 3 up-blocks; base 64 -> ngf*16,
  4 up-blocks, exactly the release).
* ``residual_path`` (default True = CPGAN); False gives AttnGAN's G_NET (no ``upsample``/``conv``).
  The shared modules are only registered when ``branch_num > 1`` (otherwise they would be unused
  parameters, which DistributedDataParallel rejects).
* ``released_mask_bug`` (default False): the release masks word attention with
  ``mask.repeat(queryL, 1)``, i.e. attention row ``b*queryL+q`` is masked with
  ``mask[(b*queryL+q) % B]`` instead of ``mask[b]``.  True reproduces the authors' outputs exactly
  (turn it on when importing their weights); both variants are vectorised.
* ``stage_grad`` (default 1 = the release): the gradient that flows from stage i+1 back into stage i's
  features (the refinement stage's input and the residual path) is multiplied by this factor
  (:func:`scale_grad`; the forward pass is unchanged). 0 trains each stage only by its own losses, as
  StackGAN-v1 trained its stages apart; not in the paper.

Initialisation: modules keep PyTorch's default init; :func:`init_weights_attngan` is AttnGAN's
``weights_init`` (orthogonal conv/linear weights, BN gamma ~ N(1, 0.02)), which the training stage
applies with ``net.apply(init_weights_attngan)`` as AttnGAN's trainer does.

Also :func:`truncated_noise`: BigGAN's truncation trick (a standard normal truncated to
[-truncation, truncation], distributed as ``scipy.stats.truncnorm(-t, t)``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cpgan.gan_losses import kl_loss

__all__ = [
    "CA_NET",
    "GET_IMAGE_G",
    "G_NET",
    "INIT_STAGE_G",
    "NEXT_STAGE_G",
    "ResBlock",
    "WordAttention",
    "init_weights_attngan",
    "released_repeat_mask",
    "scale_grad",
    "truncated_noise",
    "up_block",
]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the incoming gradient times ``scale`` backward."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # noqa: D102
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return grad * ctx.scale, None


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """``x`` unchanged in the forward pass; its gradient multiplied by ``scale`` in the backward pass
    (1 = ``x`` itself, 0 = ``x.detach()``)."""
    if scale == 1.0:
        return x
    if scale == 0.0:
        return x.detach()
    return _ScaleGrad.apply(x, float(scale))


# --------------------------------------------------------------------------------------------------
# building blocks (released names: upBlock, conv3x3, ResBlock, GET_IMAGE_G)
# --------------------------------------------------------------------------------------------------
def conv3x3(in_ch: int, out_ch: int) -> nn.Conv2d:
    """3x3 convolution, stride 1, padding 1, no bias (released ``conv3x3``)."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=1, padding=1, bias=False)


def up_block(in_ch: int, out_ch: int) -> nn.Sequential:
    """Released ``upBlock``: nearest x2 -> conv3x3(in, 2*out) -> BN2d(2*out) -> GLU.

    (B, in_ch, H, W) -> (B, out_ch, 2H, 2W).  Indices 0..3 match the release (``.1`` conv, ``.2`` BN).
    """
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        conv3x3(in_ch, out_ch * 2),
        nn.BatchNorm2d(out_ch * 2),
        nn.GLU(dim=1),
    )


class ResBlock(nn.Module):
    """Released ``ResBlock``: ``x + BN(conv(GLU(BN(conv(x)))))``; (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            conv3x3(channels, channels * 2),
            nn.BatchNorm2d(channels * 2),
            nn.GLU(dim=1),
            conv3x3(channels, channels),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x) + x


class GET_IMAGE_G(nn.Module):  # noqa: N801 (released name)
    """Image head: conv3x3(ngf -> 3, no bias) -> tanh; (B, ngf, s, s) -> (B, 3, s, s) in [-1, 1]."""

    def __init__(self, ngf: int) -> None:
        super().__init__()
        self.img = nn.Sequential(conv3x3(ngf, 3), nn.Tanh())

    def forward(self, h: Tensor) -> Tensor:
        return self.img(h)


# --------------------------------------------------------------------------------------------------
# conditioning augmentation
# --------------------------------------------------------------------------------------------------
class CA_NET(nn.Module):  # noqa: N801 (released name)
    """Conditioning augmentation (StackGAN / AttnGAN ``CA_NET``).

    ``fc``: Linear(emb_dim -> 4*c_dim) with bias -> GLU -> 2*c_dim values;
    ``mu = x[:, :c_dim]``, ``logvar = x[:, c_dim:]``, ``c = mu + noise * exp(0.5*logvar) * eps``, eps ~ N(0, I).

    ``noise`` scales the sampled part (1 = the release; 0 = ``c = mu``, deterministic; not in the paper).
    """

    def __init__(self, emb_dim: int = 256, c_dim: int = 100, noise: float = 1.0) -> None:
        super().__init__()
        if noise < 0:
            raise ValueError(f"the CA noise scale must be >= 0, got {noise}")
        self.emb_dim = emb_dim
        self.c_dim = c_dim
        self.noise = float(noise)
        self.fc = nn.Linear(emb_dim, c_dim * 4, bias=True)
        self.glu = nn.GLU(dim=1)

    def encode(self, sentence: Tensor) -> tuple[Tensor, Tensor]:
        """(B, emb_dim) -> mu (B, c_dim), logvar (B, c_dim)."""
        x = self.glu(self.fc(sentence))
        return x[:, : self.c_dim], x[:, self.c_dim :]

    def forward(self, sentence: Tensor, eps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """sentence (B, emb_dim), optional eps (B, c_dim) -> (c (B, c_dim), mu, logvar).

        eps defaults to a fresh standard-normal draw (the release samples it also at test time).
        """
        mu, logvar = self.encode(sentence)
        if eps is None:
            eps = torch.randn_like(mu)
        elif eps.shape != mu.shape:
            raise ValueError(f"ca_eps must have shape {tuple(mu.shape)} (B, c_dim), got {tuple(eps.shape)}")
        return mu + self.noise * torch.exp(0.5 * logvar) * eps, mu, logvar

    @staticmethod
    def kl_loss(mu: Tensor, logvar: Tensor) -> Tensor:
        """AttnGAN ``KL_loss``: mean of -0.5 (1 + logvar - mu^2 - exp(logvar)) (scalar)."""
        return kl_loss(mu, logvar)


# --------------------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------------------
class INIT_STAGE_G(nn.Module):  # noqa: N801 (released name)
    """G0: (z (B, z_dim), c (B, c_dim)) -> C0 (B, ngf, base_size, base_size).

    ``fc`` = Linear(c_dim + z_dim -> init_ch*4*4*2, no bias) -> BN1d -> GLU, reshaped to
    (B, init_ch, 4, 4), then ``upsample1..upsample{n_up}`` (each halves the channels, doubles the size).
    Input order is cat(c, z), c FIRST (release).  ``init_ch = ngf * 2**n_up``, ``n_up = log2(base/4)``;
    the release (base 64) has init_ch = ngf*16 (768 at ngf 48).
    """

    def __init__(self, ngf: int, z_dim: int = 100, c_dim: int = 100, base_size: int = 64) -> None:
        super().__init__()
        n_up = _log2_int(base_size // 4) if base_size >= 8 else -1
        if n_up < 1 or 4 * 2**n_up != base_size:
            raise ValueError(f"base_size must be a power of two >= 8 (e.g. 16, 32, 64), got {base_size}")
        self.n_up = n_up
        self.init_ch = ngf * 2**n_up
        self.fc = nn.Sequential(
            nn.Linear(c_dim + z_dim, self.init_ch * 4 * 4 * 2, bias=False),
            nn.BatchNorm1d(self.init_ch * 4 * 4 * 2),
            nn.GLU(dim=1),
        )
        ch = self.init_ch
        for i in range(1, n_up + 1):
            self.add_module(f"upsample{i}", up_block(ch, ch // 2))
            ch //= 2

    def forward(self, z: Tensor, c: Tensor) -> Tensor:
        h = self.fc(torch.cat((c, z), dim=1)).view(-1, self.init_ch, 4, 4)
        for i in range(1, self.n_up + 1):
            h = getattr(self, f"upsample{i}")(h)
        return h


def released_repeat_mask(mask: Tensor, query_len: int) -> Tensor:
    """The release's ``mask.repeat(queryL, 1)`` masking, reshaped per sample, vectorised.

    mask (B, T) bool (True = padding) -> (B, query_len, T) where entry [b, q] = mask[(b*query_len+q) % B].
    """
    batch = mask.shape[0]
    rows = torch.arange(batch, device=mask.device).unsqueeze(1) * query_len
    rows = (rows + torch.arange(query_len, device=mask.device).unsqueeze(0)) % batch  # (B, Q)
    return mask[rows]


class WordAttention(nn.Module):
    """Word attention F^att (AttnGAN ``GlobalAttentionGeneral``; released ``h_net{i}.att``).

    ``conv_context``: 1x1 conv (no bias) projecting words d -> idf (= ngf).  For every pixel q of the
    image features, ``b_q = softmax_k(h_q . w'_k)`` over words with padding masked (no temperature,
    as released), ``H_q = sum_k b_qk w'_k``.

    forward(h (B, idf, H, W), words (B, d, T), mask (B, T) bool True=padding or None)
        -> (context (B, idf, H, W), attention (B, T, H, W))
    """

    def __init__(self, idf: int, cdf: int, released_mask_bug: bool = False) -> None:
        super().__init__()
        self.conv_context = nn.Conv2d(cdf, idf, kernel_size=1, stride=1, padding=0, bias=False)
        self.released_mask_bug = released_mask_bug

    def forward(self, h: Tensor, words: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch, _, height, width = h.shape
        query_len = height * width
        source = self.conv_context(words.unsqueeze(3)).squeeze(3)  # (B, idf, T)
        target = h.reshape(batch, -1, query_len)  # (B, idf, Q)
        logits = torch.bmm(target.transpose(1, 2), source)  # (B, Q, T)
        if mask is not None:
            if self.released_mask_bug:
                full = released_repeat_mask(mask, query_len)  # (B, Q, T)
            else:
                full = mask.unsqueeze(1)  # (B, 1, T)
            logits = logits.masked_fill(full, float("-inf"))
        attn = torch.softmax(logits, dim=2).transpose(1, 2)  # (B, T, Q)
        context = torch.bmm(source, attn)  # (B, idf, Q)
        return context.view(batch, -1, height, width), attn.reshape(batch, -1, height, width)


class NEXT_STAGE_G(nn.Module):  # noqa: N801 (released name)
    """Refinement stage G_i: (C_{i-1} (B, ngf, s, s), words (B, d, T), mask) ->
    (h (B, ngf, 2s, 2s), attention (B, T, s, s)).

    ``att`` (:class:`WordAttention`) -> cat([C, H]) (2*ngf channels) -> ``residual`` (r_num
    :class:`ResBlock`) -> ``upsample`` (up_block 2*ngf -> ngf).  (The release also passes c_code,
    unused.)
    """

    def __init__(self, ngf: int, emb_dim: int = 256, r_num: int = 3, released_mask_bug: bool = False) -> None:
        super().__init__()
        self.att = WordAttention(ngf, emb_dim, released_mask_bug=released_mask_bug)
        self.residual = nn.Sequential(*[ResBlock(ngf * 2) for _ in range(r_num)])
        self.upsample = up_block(ngf * 2, ngf)

    def forward(self, h: Tensor, words: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        context, attn = self.att(h, words, mask)
        out = self.residual(torch.cat((h, context), dim=1))
        return self.upsample(out), attn


# --------------------------------------------------------------------------------------------------
# G_NET
# --------------------------------------------------------------------------------------------------
class G_NET(nn.Module):  # noqa: N801 (released name)
    """CPGAN coarse-to-fine generator (released ``G_NET``).

    Args:
        branch_num: number of stages (1..3 in the release; any >= 1 works); images of
            ``base_size * 2**i`` px for stage i = 0..branch_num-1.
        ngf: GAN.GF_DIM (48 COCO release, 32 AttnGAN birds).
        z_dim: noise size (100).
        c_dim: GAN.CONDITION_DIM, CA output size (100).
        emb_dim: text embedding size d (256).
        r_num: ResBlocks per refinement stage (3 COCO release).
        base_size: first-stage resolution (64 release; 16/32 for CPU presets; see module doc).
        residual_path: CPGAN's shared residual path from C0 (True) or AttnGAN's G (False).
        released_mask_bug: reproduce the release's ``mask.repeat(queryL, 1)`` masking.
        ca_noise: scale of the conditioning-augmentation sample (1 = the release, 0 = ``c = mu``).
        stage_grad: factor on the gradient from each refinement stage back into the previous stage's
            features (1 = the release, 0 = stages trained apart; see module doc).

    forward(z (B, z_dim), sentence (B, d), words (B, d, T), mask (B, T) bool True=padding or None,
            ca_eps (B, c_dim) or None)
        -> (images: list of (B, 3, s_i, s_i) in [-1, 1], one per stage,
            attention maps: list of (B, T, s_{i-1}, s_{i-1}), one per refinement stage (i >= 1),
                computed on that stage's input features,
            mu (B, c_dim), logvar (B, c_dim))
    A mask longer than T is cut to T (as AttnGAN's trainer does).
    """

    def __init__(
        self,
        branch_num: int = 3,
        ngf: int = 48,
        z_dim: int = 100,
        c_dim: int = 100,
        emb_dim: int = 256,
        r_num: int = 3,
        base_size: int = 64,
        residual_path: bool = True,
        released_mask_bug: bool = False,
        ca_noise: float = 1.0,
        stage_grad: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= stage_grad <= 1.0:
            raise ValueError(f"stage_grad must be in [0, 1], got {stage_grad}")
        if branch_num < 1:
            raise ValueError(f"branch_num must be >= 1, got {branch_num}")
        for name, val in (("ngf", ngf), ("z_dim", z_dim), ("c_dim", c_dim), ("emb_dim", emb_dim)):
            if val < 1:
                raise ValueError(f"{name} must be a positive integer, got {val}")
        if r_num < 0:
            raise ValueError(f"r_num must be >= 0, got {r_num}")
        self.branch_num = branch_num
        self.ngf = ngf
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.emb_dim = emb_dim
        self.base_size = base_size
        self.stage_grad = float(stage_grad)
        self.residual_path = residual_path and branch_num > 1
        self.image_sizes = [base_size * 2**i for i in range(branch_num)]
        # registration order = released state_dict order: upsample, conv, ca_net, h_net1, img_net1, ...
        if self.residual_path:
            self.upsample = up_block(ngf, ngf)
            self.conv = conv3x3(ngf, ngf)
        self.ca_net = CA_NET(emb_dim, c_dim, ca_noise)
        self.h_net1 = INIT_STAGE_G(ngf, z_dim, c_dim, base_size)
        self.img_net1 = GET_IMAGE_G(ngf)
        for i in range(2, branch_num + 1):
            self.add_module(f"h_net{i}", NEXT_STAGE_G(ngf, emb_dim, r_num, released_mask_bug))
            self.add_module(f"img_net{i}", GET_IMAGE_G(ngf))

    @property
    def released_mask_bug(self) -> bool:
        """Whether the word attention uses the release's ``mask.repeat(queryL, 1)`` indexing."""
        return any(m.released_mask_bug for m in self.modules() if isinstance(m, WordAttention))

    @released_mask_bug.setter
    def released_mask_bug(self, value: bool) -> None:
        for m in self.modules():
            if isinstance(m, WordAttention):
                m.released_mask_bug = bool(value)

    def _check_inputs(self, z: Tensor, sentence: Tensor, words: Tensor, mask: Tensor | None) -> Tensor | None:
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must have shape (B, {self.z_dim}), got {tuple(z.shape)}")
        batch = z.shape[0]
        if sentence.shape != (batch, self.emb_dim):
            raise ValueError(f"sentence must have shape ({batch}, {self.emb_dim}), got {tuple(sentence.shape)}")
        if self.branch_num == 1:
            return mask
        if words.dim() != 3 or words.shape[0] != batch or words.shape[1] != self.emb_dim:
            raise ValueError(f"words must have shape ({batch}, {self.emb_dim}, T), got {tuple(words.shape)}")
        if mask is None:
            return None
        n_words = words.shape[2]
        if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < n_words:
            raise ValueError(f"mask must have shape ({batch}, T={n_words}) (True = padding), got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = padding), got dtype {mask.dtype}")
        mask = mask[:, :n_words]
        if bool(mask.all(dim=1).any()):
            raise ValueError("every caption needs at least one non-padding word (a mask row is all True)")
        return mask

    def forward(
        self,
        z: Tensor,
        sentence: Tensor,
        words: Tensor,
        mask: Tensor | None = None,
        ca_eps: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
        mask = self._check_inputs(z, sentence, words, mask)
        c, mu, logvar = self.ca_net(sentence, ca_eps)
        h = self.h_net1(z, c)
        images = [self.img_net1(h)]
        att_maps: list[Tensor] = []
        res = h
        for i in range(2, self.branch_num + 1):
            h, res = scale_grad(h, self.stage_grad), scale_grad(res, self.stage_grad)
            out, att = getattr(self, f"h_net{i}")(h, words, mask)
            if self.residual_path:
                res = self.upsample(res)  # shared up-block on the previous residual (C0 for stage 2)
                h = self.conv(out + res)  # shared conv on the sum
            else:
                h = out
            images.append(getattr(self, f"img_net{i}")(h))
            att_maps.append(att)
        return images, att_maps, mu, logvar


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def init_weights_attngan(module: nn.Module) -> None:
    """AttnGAN ``weights_init``: orthogonal_(gain 1) for conv / linear weights (linear bias 0),
    BatchNorm weight ~ N(1, 0.02), bias 0.  Use as ``net.apply(init_weights_attngan)``.
    Spectral-normalised layers are initialised through their ``original`` weight.
    """
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
        param_list = getattr(getattr(module, "parametrizations", None), "weight", None)
        weight = param_list.original if param_list is not None else module.weight
        nn.init.orthogonal_(weight, gain=1.0)
        if module.bias is not None and isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
        if param_list is not None:  # spectral norm: refresh the power-iteration vectors for the new weight
            for p in param_list:
                if hasattr(p, "_power_method") and hasattr(p, "_reshape_weight_to_matrix"):
                    with torch.no_grad():
                        p._power_method(p._reshape_weight_to_matrix(weight), 50)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if module.weight is not None:
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)


def truncated_noise(
    batch: int,
    z_dim: int,
    truncation: float | None = None,
    generator: torch.Generator | None = None,
    *,
    method: str = "inverse_cdf",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Noise z (batch, z_dim): standard normal truncated to [-truncation, truncation] (BigGAN).

    Same distribution as ``scipy.stats.truncnorm.rvs(-t, t)``.  ``truncation=None`` gives plain
    N(0, 1).  ``method``: ``"inverse_cdf"`` (one pass: u ~ U(Phi(-t), Phi(t)), z = Phi^-1(u); exact and
    fast for any t) or ``"resample"`` (draw N(0, 1) and redraw every entry with |z| > t until none is
    left; vectorised, loops only over redraw rounds).
    """
    if batch < 0 or z_dim < 1:
        raise ValueError(f"batch must be >= 0 and z_dim >= 1, got batch={batch}, z_dim={z_dim}")
    if truncation is None:
        return torch.randn(batch, z_dim, generator=generator, device=device, dtype=dtype)
    if not truncation > 0:  # also rejects NaN
        raise ValueError(f"truncation must be > 0 (or None for no truncation), got {truncation}")
    if math.isinf(truncation):
        return torch.randn(batch, z_dim, generator=generator, device=device, dtype=dtype)
    # largest value of `dtype` that is <= truncation, so |z| <= truncation holds exactly after the cast
    bound = torch.tensor(truncation, dtype=dtype)
    if float(bound) > truncation:
        bound = torch.nextafter(bound, torch.zeros_like(bound))
    bound_f = float(bound)
    if method == "inverse_cdf":
        # work in float64 so tails (Phi close to 0 / 1) stay accurate, then cast
        lo = 0.5 * math.erfc(truncation / math.sqrt(2.0))  # Phi(-t)
        u = torch.rand(batch, z_dim, generator=generator, device=device, dtype=torch.float64)
        z = torch.special.ndtri(lo + u * (1.0 - 2.0 * lo))
        return z.to(dtype).clamp_(-bound_f, bound_f)
    if method == "resample":
        z = torch.randn(batch, z_dim, generator=generator, device=device, dtype=dtype)
        bad = z.abs() > bound_f
        while bool(bad.any()):
            fresh = torch.randn(int(bad.sum()), generator=generator, device=device, dtype=dtype)
            z[bad] = fresh
            bad = z.abs() > bound_f
        return z
    raise ValueError(f"method must be 'inverse_cdf' or 'resample', got {method!r}")


def _log2_int(n: int) -> int:
    """log2 of a positive integer power of two, else -1."""
    if n < 1 or n & (n - 1):
        return -1
    return n.bit_length() - 1

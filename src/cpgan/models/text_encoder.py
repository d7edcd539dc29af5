"""Text encoders: AttnGAN's ``RNN_ENCODER`` and CPGAN's Memory-Attended Text Encoder (MATE).

Plain encoder (AttnGAN, REFERENCE.md §7.4; the ablation baseline)::

    x = Dropout(Embedding(captions))                     (B, T, 300)
    words, (h_n, c_n) = BiLSTM(pack(x, lengths))         hidden d/2 = 128 per direction
    words    -> (B, d, T), padding steps exactly zero
    sentence = cat(h_n[forward], h_n[backward])          (B, d)

MATE (CPGAN paper §3.2, DESIGN.md §3.1, released ``code/model.py`` ``RNN_ENCODER`` + ``MEM_TRANS``)::

    p(m) = memory_emb_2(LeakyReLU_0.01(memory_emb_1(m)))            (B, 256, T)  = MEM_TRANS
    x    = Dropout(encoder(tanh(cat(Embedding(captions)^T, p(m)))))  1x1 conv 556 -> 300, no bias
    then the same Bi-LSTM as above.

Parameter names follow the release exactly (``word_encoder``, ``encoder``, ``rnn``;
``memory_emb_1``, ``memory_emb_2``), so the authors' weights load without renaming. The release keeps
``MEM_TRANS`` as a separate module (``NET_T.pkl``); here :class:`MemoryProjection` is that module and a
MATE :class:`TextEncoder` owns one as the submodule ``memory_projection`` (pass an existing instance
to share it). :meth:`TextEncoder.release_state_dicts` / :meth:`TextEncoder.load_release_state_dicts`
convert to and from the release's two separate state dicts (``RNN_ENCODER``, ``MEM_TRANS``), and
also accept an AttnGAN ``text_encoder*.pth`` (whose embedding is named ``encoder``).

Callers use the same call for both variants::

    words, sentence = encoder(captions, lengths, memory=memory)

where ``memory`` is the raw per-token memory ``(B, T, 1024)`` (e.g. from :func:`gather_memory`) for
MATE and ``None`` for the plain encoder (passing memory to a plain encoder is an error).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..utils.checkpoint import check_state_dict

__all__ = ["MemoryProjection", "TextEncoder", "gather_memory"]


class MemoryProjection(nn.Module):
    """Memory projection ``p(m)``: the released ``MEM_TRANS`` (paper §3.2).

    ``memory_emb_1``: Conv1d(memory_dim -> hidden_dim, k=1, bias) -> LeakyReLU(0.01) ->
    ``memory_emb_2``: Conv1d(hidden_dim -> out_dim, k=1, no bias). Weights initialised
    U(-init_range, init_range) as the release's ``init_trainable_weights`` (biases: PyTorch default).

    Args:
        memory_dim: width of a memory vector (release: 1024).
        hidden_dim: middle width (release: 512).
        out_dim: output width (release: 256 = d).
        negative_slope: LeakyReLU slope (release: ``nn.LeakyReLU()`` default 0.01).
        init_range: uniform init range of the two conv weights.
    """

    def __init__(
        self,
        memory_dim: int = 1024,
        hidden_dim: int = 512,
        out_dim: int = 256,
        negative_slope: float = 0.01,
        init_range: float = 0.1,
    ) -> None:
        super().__init__()
        self.memory_dim = memory_dim
        self.out_dim = out_dim
        self.negative_slope = negative_slope
        self.memory_emb_1 = nn.Conv1d(memory_dim, hidden_dim, kernel_size=1, bias=True)
        self.memory_emb_2 = nn.Conv1d(hidden_dim, out_dim, kernel_size=1, bias=False)
        nn.init.uniform_(self.memory_emb_1.weight, -init_range, init_range)
        nn.init.uniform_(self.memory_emb_2.weight, -init_range, init_range)

    def forward(self, memory: Tensor) -> Tensor:
        """Project memories, channels first as the release's ``MEM_TRANS.forward``.

        Args:
            memory: ``(B, memory_dim, T)``.

        Returns:
            ``(B, out_dim, T)``.
        """
        if memory.dim() != 3 or memory.shape[1] != self.memory_dim:
            raise ValueError(
                f"MemoryProjection expects (B, {self.memory_dim}, T) (channels first), got "
                f"{tuple(memory.shape)}; transpose a (B, T, {self.memory_dim}) tensor with .transpose(1, 2)"
            )
        x = F.leaky_relu(self.memory_emb_1(memory), self.negative_slope)
        return self.memory_emb_2(x)


def gather_memory(
    bank: Tensor,
    token_ids: Tensor,
    token_to_memory: Tensor | None = None,
    missing_id: int | None = None,
) -> Tensor:
    """Per-token memory vectors from a memory bank (vectorised gather).

    Args:
        bank: ``(V, D)`` memory bank (D = 1024), row ``r`` = memory of memory-id ``r``.
        token_ids: ``(B, T)`` caption token ids (any integer shape works; output adds a last dim).
        token_to_memory: optional ``(vocab,)`` integer map caption-id -> memory-id (the release's
            ``transvob.pkl``); without it caption ids index the bank directly.
        missing_id: memory id meaning "no memory" (zeros). Negative ids always mean "no memory".

    Returns:
        ``(B, T, D)`` memories, zero where the id is missing. Same dtype/device as ``bank``.
    """
    if bank.dim() != 2:
        raise ValueError(f"memory bank must be (V, D), got shape {tuple(bank.shape)}")
    ids = token_ids.to(device=bank.device, dtype=torch.long)
    if token_to_memory is not None:
        table = token_to_memory.to(device=bank.device, dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= table.shape[0]):
            raise ValueError(
                f"caption ids must lie in [0, {table.shape[0]}) for the token->memory map, "
                f"got range [{int(ids.min())}, {int(ids.max())}]"
            )
        ids = table[ids]
    valid = ids >= 0
    if missing_id is not None:
        valid &= ids != missing_id
    if ids.numel() and bool((valid & (ids >= bank.shape[0])).any()):
        raise ValueError(
            f"memory ids must lie in [0, {bank.shape[0]}) (bank rows) or be missing_id/negative; "
            f"got max {int(ids[valid].max())}"
        )
    rows = bank[torch.where(valid, ids, torch.zeros_like(ids))]
    return rows * valid.unsqueeze(-1).to(rows.dtype)


class TextEncoder(nn.Module):
    """Bi-LSTM text encoder, plain (AttnGAN ``RNN_ENCODER``) or memory-attended (CPGAN MATE).

    Args:
        vocab_size: number of caption tokens (row 0 = ``<end>``/padding, an ordinary row as in
            AttnGAN and the release).
        embed_dim: word embedding width (300).
        hidden_dim: output width d (256); each LSTM direction has ``hidden_dim // 2`` units.
        dropout: dropout probability on the LSTM input (0.5).
        num_layers: LSTM layers (1). With more, the LSTM's inter-layer dropout is ``dropout`` and
            the sentence code is the last layer's final states.
        memory_dim: 0 = plain encoder; > 0 (release: 1024) = MATE with per-token memories.
        memory_proj_dim: width of ``p(m)`` (release: 256, fixed by ``encoder.weight`` (300, 556, 1)).
        memory_hidden_dim: middle width of ``p(m)`` (release: 512).
        memory_projection: an existing :class:`MemoryProjection` to use (and own as the submodule
            ``memory_projection``); a new one is built when ``None`` (MATE only).
        init_range: uniform init range of the embedding (AttnGAN) and of ``encoder`` (release).
        embedding_init: ``"uniform"`` = U(-init_range, init_range) as AttnGAN's ``init_weights``;
            ``"normal"`` = PyTorch's N(0, 1), which is what the CPGAN release leaves the embedding at
            (its ``init_weights`` only re-initialises the 1x1 conv).
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 300,
        hidden_dim: int = 256,
        dropout: float = 0.5,
        num_layers: int = 1,
        memory_dim: int = 0,
        memory_proj_dim: int = 256,
        memory_hidden_dim: int = 512,
        memory_projection: MemoryProjection | None = None,
        init_range: float = 0.1,
        embedding_init: str = "uniform",
    ) -> None:
        super().__init__()
        if hidden_dim % 2:
            raise ValueError(f"hidden_dim must be even (two LSTM directions), got {hidden_dim}")
        if embedding_init not in ("uniform", "normal"):
            raise ValueError(f"embedding_init must be 'uniform' or 'normal', got {embedding_init!r}")
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.memory_dim = memory_dim

        # Registration order = the release's state_dict order: word_encoder, encoder, rnn.
        self.word_encoder = nn.Embedding(vocab_size, embed_dim)
        if embedding_init == "uniform":
            nn.init.uniform_(self.word_encoder.weight, -init_range, init_range)
        if memory_dim > 0:
            self.encoder = nn.Conv1d(embed_dim + memory_proj_dim, embed_dim, kernel_size=1, bias=False)
            nn.init.uniform_(self.encoder.weight, -init_range, init_range)
        self.drop = nn.Dropout(dropout)
        self.rnn = nn.LSTM(
            embed_dim,
            hidden_dim // 2,
            num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
            bidirectional=True,
        )
        if memory_dim > 0:
            if memory_projection is None:
                memory_projection = MemoryProjection(
                    memory_dim, memory_hidden_dim, memory_proj_dim, init_range=init_range
                )
            if (
                memory_projection.memory_dim != memory_dim
                or memory_projection.out_dim != memory_proj_dim
            ):
                raise ValueError(
                    f"memory_projection maps {memory_projection.memory_dim} -> "
                    f"{memory_projection.out_dim}, but the encoder expects {memory_dim} -> {memory_proj_dim}"
                )
            self.memory_projection = memory_projection
        elif memory_projection is not None:
            raise ValueError("memory_projection given but memory_dim=0 (plain encoder); set memory_dim")

    @property
    def uses_memory(self) -> bool:
        """True for the memory-attended (MATE) variant."""
        return self.memory_dim > 0

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, captions: Tensor, lengths: Tensor) -> Tensor:
        if captions.dim() != 2 or captions.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"captions must be a (B, T) integer tensor, got {captions.dtype} {tuple(captions.shape)}"
            )
        batch, steps = captions.shape
        lengths = torch.as_tensor(lengths)
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
        lengths = lengths.to("cpu", torch.int64)  # pack_padded_sequence wants CPU lengths
        if batch and (int(lengths.min()) < 1 or int(lengths.max()) > steps):
            raise ValueError(
                f"caption lengths must lie in [1, T={steps}], "
                f"got [{int(lengths.min())}, {int(lengths.max())}]"
            )
        if batch and (int(captions.min()) < 0 or int(captions.max()) >= self.vocab_size):
            raise ValueError(
                f"caption ids must lie in [0, {self.vocab_size}) (vocabulary size), got "
                f"[{int(captions.min())}, {int(captions.max())}]; the vocabulary and the encoder disagree"
            )
        return lengths

    def embed(
        self, captions: Tensor, memory: Tensor | None = None, memory_emb: Tensor | None = None
    ) -> Tensor:
        """LSTM input sequence (after dropout).

        Args:
            captions: ``(B, T)`` token ids.
            memory: MATE only, raw per-token memories ``(B, T, memory_dim)``.
            memory_emb: MATE only, already projected memories ``(B, memory_proj_dim, T)`` (the
                release's ``memory_emb`` argument); give either this or ``memory``.

        Returns:
            ``(B, T, embed_dim)``.
        """
        word_emb = self.word_encoder(captions)  # (B, T, E)
        if not self.uses_memory:
            if memory is not None or memory_emb is not None:
                raise ValueError("this TextEncoder is plain (memory_dim=0); do not pass memory")
            return self.drop(word_emb)
        if (memory is None) == (memory_emb is None):
            raise ValueError(
                "MATE TextEncoder needs exactly one of memory (B, T, memory_dim) or memory_emb "
                "(B, memory_proj_dim, T); see gather_memory()"
            )
        batch, steps = captions.shape
        if memory is not None:
            if memory.shape != (batch, steps, self.memory_dim):
                raise ValueError(
                    f"memory must be (B, T, {self.memory_dim}) = {(batch, steps, self.memory_dim)}, "
                    f"got {tuple(memory.shape)}"
                )
            memory_emb = self.memory_projection(memory.transpose(1, 2).to(word_emb.dtype))
        assert memory_emb is not None
        expected = (batch, self.encoder.in_channels - self.embed_dim, steps)
        if memory_emb.shape != expected:
            raise ValueError(
                f"memory_emb must be (B, memory_proj_dim, T) = {expected}, got {tuple(memory_emb.shape)}"
            )
        # Release: emb = tanh(cat(word_emb, mem_emb)) -> 1x1 conv (no bias) -> dropout.
        emb = torch.tanh(torch.cat((word_emb.transpose(1, 2), memory_emb), dim=1))
        return self.drop(self.encoder(emb)).transpose(1, 2)

    def forward(
        self,
        captions: Tensor,
        lengths: Tensor,
        memory: Tensor | None = None,
        memory_emb: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Encode captions.

        Args:
            captions: ``(B, T)`` long token ids; values after each caption's length are ignored.
            lengths: ``(B,)`` lengths in ``[1, T]``, any order (no sorting needed).
            memory: MATE only: ``(B, T, memory_dim)`` raw per-token memories (:func:`gather_memory`).
            memory_emb: MATE only: ``(B, memory_proj_dim, T)`` pre-projected memories instead.

        Returns:
            ``words`` ``(B, d, T)`` per-step Bi-LSTM outputs, exactly zero at padding steps;
            ``sentence`` ``(B, d)`` = [final forward hidden ; final backward hidden].
        """
        cpu_lengths = self._check_inputs(captions, lengths)
        x = self.embed(captions, memory, memory_emb)
        packed = pack_padded_sequence(x, cpu_lengths, batch_first=True, enforce_sorted=False)
        output, (h_n, _) = self.rnn(packed)
        # h_n comes back in the original batch order (PyTorch un-sorts it).
        output, _ = pad_packed_sequence(output, batch_first=True, total_length=captions.shape[1])
        words = output.transpose(1, 2)  # (B, d, T), zeros after each length
        sentence = h_n[-2:].transpose(0, 1).reshape(captions.shape[0], self.hidden_dim)
        return words, sentence

    # -------------------------------------------------------- release interop
    def release_state_dicts(self) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """State dicts in the release's layout: ``(RNN_ENCODER, MEM_TRANS or None)``."""
        full = self.state_dict()
        prefix = "memory_projection."
        rnn = {k: v for k, v in full.items() if not k.startswith(prefix)}
        mem = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        return rnn, (mem if self.uses_memory else None)

    def load_release_state_dicts(
        self,
        rnn_encoder: Mapping[str, Tensor],
        mem_trans: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Load an ``RNN_ENCODER`` state dict (CPGAN release or AttnGAN) and optionally ``MEM_TRANS``.

        An AttnGAN ``text_encoder*.pth`` names the embedding ``encoder.weight``; for a plain encoder
        it is renamed to ``word_encoder.weight``. ``mem_trans=None`` leaves the projection as is.
        """
        rnn = dict(rnn_encoder)
        if not self.uses_memory and "word_encoder.weight" not in rnn and "encoder.weight" in rnn:
            rnn["word_encoder.weight"] = rnn.pop("encoder.weight")
        own_rnn, _ = self.release_state_dicts()
        _load_exact(self, rnn, own_rnn, "RNN_ENCODER")
        if mem_trans is not None:
            if not self.uses_memory:
                raise ValueError("mem_trans given but this TextEncoder is plain (memory_dim=0)")
            mem = dict(mem_trans)
            _load_exact(self.memory_projection, mem, self.memory_projection.state_dict(), "MEM_TRANS")


def _load_exact(
    module: nn.Module, given: dict[str, Tensor], own: Mapping[str, Tensor], what: str
) -> None:
    check_state_dict(dict(own), given, f"the {what} part of the text encoder", "check vocab_size / memory_dim / "
                     "the file's origin")
    module.load_state_dict(given, strict=False)

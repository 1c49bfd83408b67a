"""Batch-1 greedy decoding with a static KV cache, one step captured as a CUDA graph.

At batch 1 a decode step reads every weight once and does little arithmetic, so a 7B model's
step is a few milliseconds of GPU time; Hugging Face's eager forward spends about as long in
Python launching its kernels, and that overhead hides what a compact weight format saves.
:class:`GreedyDecoder` removes it the standard way: the KV cache is a ``StaticCache`` (fixed
shapes, updated in place), the step's inputs live in fixed tensors, and the whole step is
recorded once as a CUDA graph and replayed. The eager loop (the default, and the only mode on
a CPU) gives exactly ``model.generate``'s greedy tokens (tests/test_decode.py on CPU; on an
H200 the same comparison, run by hand on a tiny float32 LLaMA, matched too).

The CUDA-graph mode is for timing only, for now: on an H200 (transformers 5.17, a tiny float32
LLaMA) its greedy tokens left the eager decode's (and ``generate``'s) from the third token on.
Passing an explicit [1, max_len] attention mask (which OPT, deriving its positions from the
mask, does not allow) moved the divergence to the ninth token, and there the replayed step's
logits differed from the eager step's on the same tokens by 5e-3 at the first replay and about
0.1 later. The
replay runs the eager step's kernels on the same shapes, so its tokens/s measure that work, but
its outputs are not right; ``graph=True`` warns. tests/test_decode.py keeps the check as a strict expected failure.
"""
from __future__ import annotations

import warnings

import torch

GRAPH_WARNING = ("GreedyDecoder(graph=True): the replayed CUDA graph's logits differ from the eager step's "
                 "(see sparsellm.decode); use it to time decoding, not for its outputs")


class GreedyDecoder:
    """Greedy decoding of one sequence: ``prefill(prompt_ids)`` then ``decode(steps)``.

    ``graph``: False (default) runs each step eagerly; True captures the step as a CUDA graph
    and replays it (timing only, see the module docs; CUDA only). ``graph_error`` holds why a
    capture failed (the decoder then runs eagerly)."""

    def __init__(self, model, max_len: int, graph: bool = False):
        from transformers import StaticCache

        self.model = model
        self.device = next(model.parameters()).device
        if graph and self.device.type != "cuda":
            raise ValueError("a CUDA graph needs the model on a CUDA device")
        if graph:
            warnings.warn(GRAPH_WARNING, RuntimeWarning, stacklevel=2)
        self.want_graph = bool(graph)
        self.max_len = max_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.length = 0
        self.graph = None
        self.graph_error = None
        self.logits = None

    @torch.no_grad()
    def _step(self) -> torch.Tensor:
        out = self.model(self.ids, past_key_values=self.cache, cache_position=self.position, use_cache=True)
        return out.logits[:, -1]

    @torch.no_grad()
    def prefill(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt (1 x P) and return the first generated token (1 x 1)."""
        if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
            raise ValueError(f"prompt_ids must be 1 x P, got {tuple(prompt_ids.shape)}")
        length = prompt_ids.shape[1]
        if length >= self.max_len:
            raise ValueError(f"a prompt of {length} tokens leaves no room in a cache of {self.max_len}")
        self.cache.reset()
        out = self.model(prompt_ids.to(self.device), past_key_values=self.cache,
                         cache_position=torch.arange(length, device=self.device), use_cache=True)
        self.ids.copy_(out.logits[:, -1:].argmax(-1))
        self.position.fill_(length)
        self.length = length
        if self.want_graph and self.graph is None and self.graph_error is None:
            self._capture()
        return self.ids.clone()

    def _capture(self) -> None:
        # Warm-up steps on a side stream first (autotuners, lazy initialisation and allocator
        # pools must not run inside the capture); they write the cache at the current position,
        # which the replays overwrite.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.logits = self._step()
        except Exception as exc:  # an op that syncs with the host cannot be captured: run eagerly
            self.graph_error = f"{type(exc).__name__}: {exc}"[:500]
            raise
            torch.cuda.synchronize()
            return
        self.graph = graph

    @torch.no_grad()
    def decode(self, steps: int) -> torch.Tensor:
        """Generate ``steps`` more tokens after the last one; returns them (1 x steps)."""
        if self.length == 0:
            raise RuntimeError("call prefill() first")
        if self.length + steps > self.max_len:
            raise ValueError(f"{self.length} + {steps} tokens exceed the cache of {self.max_len}")
        tokens = []
        for _ in range(steps):
            logits = self._replay() if self.graph is not None else self._step()
            tokens.append(self.ids.clone())
            self.ids.copy_(logits.argmax(-1, keepdim=True))
            self.position.add_(1)
            self.length += 1
        return torch.cat(tokens, dim=1)

    def _replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits

    @property
    def mode(self) -> str:
        return "cuda-graph" if self.graph is not None else "eager"

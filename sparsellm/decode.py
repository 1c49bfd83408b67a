"""Batch-1 greedy decoding with a static KV cache, one step captured as a CUDA graph.

At batch 1 a decode step reads every weight once and does little arithmetic, so a 7B model's
step is a few milliseconds of GPU time; Hugging Face's eager forward spends about as long in
Python launching its kernels, and that overhead hides what a compact weight format saves.
:class:`GreedyDecoder` removes it the standard way: the KV cache is a ``StaticCache`` (fixed
shapes, updated in place), the step's inputs live in fixed tensors, and the whole step is
recorded once as a CUDA graph and replayed. Both modes give ``model.generate``'s greedy tokens
(tests/test_decode.py: eager on the CPU, eager and the graph on a GPU).

The cache's write position is its own counter: a static layer's ``cumulative_length`` is a
tensor that every forward step advances in place (transformers 5), whatever ``cache_position``
says. The steps run before a capture (autotuners and lazy initialisation must not run inside
it) advance it too, so :meth:`GreedyDecoder._warm_up` puts every counter back afterwards;
without that, the replays wrote each new key two slots past its position and the tokens left
``generate``'s from the third on (seen on an H200). A cache whose counter is a Python number
(a sliding-window layer's ``cumulative_length_int``, beside its tensor) cannot be replayed (the
graph would keep the value it was captured with): the decoder then runs eagerly and says why in
``graph_error``.

``compile=True`` also puts the step through ``torch.compile`` (inductor) first, which fuses the
small operations between the linears (norms, rotary embedding, residual adds, the cache writes):
in a graph-replayed step each of them is still a kernel of a few microseconds, and at batch 1
they are a share of the step that grows as the linears shrink. The sparse linears of
:mod:`sparsellm.export.sparse_gpu` stay their own kernels (custom operators), so the step
compiles without a graph break at each of them. Compiling happens in the first decode step (in
the warm-up, with ``graph``).
"""
from __future__ import annotations

import inspect

import torch


def cache_argument(model) -> str:
    """The name under which ``model``'s forward takes its KV cache: ``cache`` in newer
    transformers (5.24 warns that ``past_key_values`` goes in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output):
    """The KV cache a forward returned (``cache`` or, in older transformers, ``past_key_values``)."""
    return output.cache if hasattr(output, "cache") else output.past_key_values


class GreedyDecoder:
    """Greedy decoding of one sequence: ``prefill(prompt_ids)`` then ``decode(steps)``
    (after ``prefill``, ``cat([decode(s), ids], 1)`` is the first ``s + 1`` generated tokens, the
    first of them the one ``prefill`` returned).

    ``graph``: False (default) runs each step eagerly; True captures the step as a CUDA graph
    and replays it (CUDA only). ``graph_error`` holds why a capture was not possible (the
    decoder then runs eagerly). ``compile``: the step goes through ``torch.compile`` (module
    docs), with or without the graph."""

    def __init__(self, model, max_len: int, graph: bool = False, compile: bool = False):
        from transformers import StaticCache

        self.model = model
        self.device = next(model.parameters()).device
        if graph and self.device.type != "cuda":
            raise ValueError("a CUDA graph needs the model on a CUDA device")
        self.want_graph = bool(graph)
        self.max_len = max_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.length = 0
        self.graph = None
        self.graph_error = None
        self.logits = None
        self.cache_kw = cache_argument(model)
        self.compiled = bool(compile)
        # dynamic=False: a decode step has one shape; a recompile is a bug, not a new shape
        self._run = torch.compile(self._forward_step, dynamic=False) if compile else self._forward_step

    def _forward_step(self) -> torch.Tensor:
        out = self.model(self.ids, cache_position=self.position, use_cache=True, **{self.cache_kw: self.cache})
        return out.logits[:, -1]

    @torch.no_grad()
    def _step(self) -> torch.Tensor:
        return self._run()

    @torch.no_grad()
    def prefill(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt (1 x P) and return the first generated token (1 x 1)."""
        if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
            raise ValueError(f"prompt_ids must be 1 x P, got {tuple(prompt_ids.shape)}")
        length = prompt_ids.shape[1]
        if length >= self.max_len:
            raise ValueError(f"a prompt of {length} tokens leaves no room in a cache of {self.max_len}")
        self.cache.reset()
        out = self.model(prompt_ids.to(self.device), cache_position=torch.arange(length, device=self.device),
                         use_cache=True, **{self.cache_kw: self.cache})
        self.ids.copy_(out.logits[:, -1:].argmax(-1))
        self.position.fill_(length)
        self.length = length
        if self.want_graph and self.graph is None and self.graph_error is None:
            self._capture()
        return self.ids.clone()

    def _counters(self) -> list:
        """(layer, attribute) of every write counter the cache keeps (see the module docs). A
        sliding-window layer (e.g. Mistral's) keeps a Python ``cumulative_length_int`` beside the
        tensor, which picks its write path (in place, or roll once the window is full): a
        warm-up must put it back too, and a replay could not advance it."""
        return [(layer, name) for layer in getattr(self.cache, "layers", ())
                for name in ("cumulative_length", "cumulative_length_int") if hasattr(layer, name)]

    def _warm_up(self, steps: int) -> None:
        """Run ``steps`` decode steps whose only lasting effect is what they leave initialised
        (kernels tuned, cache tensors allocated): every cache counter is put back in place (same
        tensor, so a graph captured afterwards advances the one the model reads). The keys and
        values they wrote at the current position are the ones the next real step writes again."""
        saved = [(layer, name, getattr(layer, name)) for layer, name in self._counters()]
        saved = [(layer, name, v.clone() if torch.is_tensor(v) else v) for layer, name, v in saved]
        if self.device.type == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(steps):
                    self._step()
            torch.cuda.current_stream().wait_stream(side)
        else:
            for _ in range(steps):
                self._step()
        for layer, name, value in saved:
            current = getattr(layer, name)
            if torch.is_tensor(current):
                current.copy_(value)
            else:
                setattr(layer, name, value)

    def _capture(self) -> None:
        python_counters = [name for layer, name in self._counters() if not torch.is_tensor(getattr(layer, name))]
        if python_counters:
            self.graph_error = (f"the cache's {python_counters[0]} is a Python number: a replayed graph would keep "
                                "its captured value")
            return
        # warm-up on a side stream: autotuners, lazy initialisation and allocator pools must not
        # run inside the capture
        self._warm_up(2)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.logits = self._step()
        except Exception as exc:  # an op that syncs with the host cannot be captured: run eagerly
            self.graph_error = f"{type(exc).__name__}: {exc}"[:500]
            self.logits = None
            torch.cuda.synchronize()
            return
        self.graph = graph

    @torch.no_grad()
    def decode(self, steps: int) -> torch.Tensor:
        """Run ``steps`` decode steps; returns the ``steps`` tokens they consumed (1 x steps; 1 x 0
        for 0 steps), starting with the one in ``ids`` (:meth:`prefill`'s token, or the one the
        previous call generated last); the token the last step generates is left in ``ids``."""
        if self.length == 0:
            raise RuntimeError("call prefill() first")
        if steps < 0:
            raise ValueError(f"steps must be >= 0 (the number of tokens to generate), got {steps}")
        if self.length + steps > self.max_len:
            raise ValueError(f"{self.length} + {steps} tokens exceed the cache of {self.max_len}")
        tokens = []
        for _ in range(steps):
            logits = self._replay() if self.graph is not None else self._step()
            tokens.append(self.ids.clone())
            self.ids.copy_(logits.argmax(-1, keepdim=True))
            self.position.add_(1)
            self.length += 1
        return torch.cat(tokens, dim=1) if tokens else self.ids.new_empty(1, 0)

    def _replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits

    @property
    def mode(self) -> str:
        mode = "cuda-graph" if self.graph is not None else "eager"
        return f"compiled+{mode}" if self.compiled else mode

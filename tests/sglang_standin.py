"""A stand-in for an SGLang server: SGLang's documented HTTP API over a real (tiny) transformers model.

Tests cannot run SGLang here (it needs a GPU), so etsq's SGLang client is tested over real HTTP
against this server, which speaks exactly the request and response fields SGLang documents
(docs/basic_usage/native_api, docs/basic_usage/sampling_params, `io_struct.GenerateReqInput`,
docs/references/production_metrics):

- `POST /generate`: `text` (str | list) or `input_ids`, `sampling_params` (dict | one per item) with
  `max_new_tokens`, `temperature`, `top_p`, `top_k`, `stop`, `stop_token_ids`, `ignore_eos`,
  `skip_special_tokens`, `no_stop_trim`, `n`, `sampling_seed`; `return_logprob`,
  `logprob_start_len`, `top_logprobs_num`, `token_ids_logprob`.  Each result is
  `{"text", "output_ids", "meta_info"}`, `meta_info` holding `id`, `finish_reason`
  (`{"type": "stop", "matched": str | id}` / `{"type": "length", "length": n}`), `prompt_tokens`,
  `completion_tokens`, `cached_tokens`, `e2e_latency`, `weight_version` and, with `return_logprob`,
  `input_token_logprobs`, `output_token_logprobs`, `input_top_logprobs`, `output_top_logprobs`,
  `input_token_ids_logprobs`, `output_token_ids_logprobs` (entries `[logprob, token_id, text]`,
  the first input position `None`).  A batch returns a list, `n` copies per item in item order.
- `GET /get_model_info`, `GET /health`, `POST /tokenize` (`prompt` -> `tokens`, `count`,
  `max_model_len`) and `GET /metrics` (`sglang:num_used_tokens`, `sglang:token_usage`,
  `sglang:cache_hit_rate`, `sglang:num_running_reqs`, ... with a `model_name` label).

KV figures are real for this server: a token radix tree gives each request's `cached_tokens` (its
prompt's longest cached prefix, at most all but the last token), and the tokens held by requests in
flight are `num_used_tokens`.  Requests are served one at a time.  Bad input is HTTP 400 with
`{"error": {"message": ...}}`, as SGLang answers.

With `--fork` it also speaks the reference implementation's SGLang fork: sampling params
`forward_only` and `logits_require_id` [good, bad, step tag] return `scores`, p(good) / (p(good) +
p(bad)) at every step-tag position (as its client reads them: `scores`, else `meta_info.scores`).
With `--no-tokenize` it lacks `/tokenize`, as SGLang releases before that endpoint (the fork's) do.

    python -m tests.sglang_standin --model DIR --port 30000 [--fork] [--no-tokenize]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SAMPLING_KEYS = {
    "max_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids", "ignore_eos",
    "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "n", "sampling_seed",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens",
}  # fmt: skip
FORK_KEYS = {"forward_only", "logits_require_id"}


class BadRequest(ValueError):
    """Input SGLang would refuse with HTTP 400."""


# --------------------------------------------------------------------------- radix cache


class RadixCache:
    """Token prefixes the server has computed (a trie; nothing is ever evicted in a test's lifetime)."""

    def __init__(self) -> None:
        self.root: dict[int, dict] = {}

    def match(self, ids: list[int]) -> int:
        node, depth = self.root, 0
        for token in ids:
            if token not in node:
                break
            node, depth = node[token], depth + 1
        return depth

    def insert(self, ids: list[int]) -> None:
        node = self.root
        for token in ids:
            node = node.setdefault(token, {})


def union_size(sequences: list[list[int]]) -> int:
    """Tokens in the union of the sequences' prefixes: the KV that requests in flight hold."""
    trie, count = RadixCache(), 0
    for seq in sequences:
        count += len(seq) - trie.match(seq)
        trie.insert(seq)
    return count


# --------------------------------------------------------------------------- the engine


@dataclass
class Sampling:
    """One item's sampling parameters, SGLang's defaults filled in."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: set[int] = field(default_factory=set)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    seed: int | None = None

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Sampling:
        unknown = set(raw) - SAMPLING_KEYS
        if unknown:
            raise BadRequest(f"SamplingParams got unexpected keyword argument(s) {sorted(unknown)}")
        stop = raw.get("stop") or []
        max_new = raw.get("max_new_tokens", 128)
        if max_new is not None and max_new < 0:
            raise BadRequest(f"max_new_tokens must be at least 0, got {max_new}.")
        return cls(
            max_new_tokens=128 if max_new is None else int(max_new),
            temperature=float(raw.get("temperature", 1.0) if raw.get("temperature") is not None else 1.0),
            top_p=float(raw.get("top_p") or 1.0),
            top_k=int(raw.get("top_k") or -1),
            stop=[stop] if isinstance(stop, str) else list(stop),
            stop_token_ids=set(raw.get("stop_token_ids") or []),
            ignore_eos=bool(raw.get("ignore_eos", False)),
            skip_special_tokens=bool(raw.get("skip_special_tokens", True)),
            no_stop_trim=bool(raw.get("no_stop_trim", False)),
            seed=raw.get("sampling_seed"),
        )


@dataclass
class LogprobAsk:
    """What logprobs one item asked for."""

    start: int = -1
    top: int = 0
    ids: list[int] = field(default_factory=list)


def _entry(logprobs: torch.Tensor, token: int) -> list[Any]:
    return [float(logprobs[token]), int(token), None]


class Engine:
    """The model, its tokenizer, the radix cache and the metrics counters."""

    def __init__(self, path: str, max_total_tokens: int = 16384, fork: bool = False) -> None:
        torch.set_num_threads(1)
        self.path, self.fork, self.max_total_tokens = path, fork, max_total_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {
            i
            for i in (eos if isinstance(eos, list) else [eos]) + [self.tokenizer.eos_token_id]
            if i is not None
        }
        self.cache = RadixCache()
        self.lock = threading.Lock()  # one request computes at a time
        self.stats_lock = threading.Lock()
        self.active: dict[str, list[int]] = {}
        self.waiting = 0
        self.counters = {"prompt": 0, "generation": 0, "cached": 0}

    @property
    def context_len(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    # ---- requests

    def generate(self, body: dict[str, Any]) -> Any:
        items, is_batch = self._inputs(body)
        params = self._sampling_list(body.get("sampling_params"), len(items), is_batch)
        asks = self._logprob_asks(body, len(items), is_batch)
        if body.get("stream"):
            raise BadRequest("this stand-in does not stream")
        n = max((p.get("n") or 1) for p in params)
        outputs = []
        with self._queued():
            for ids, raw, ask in zip(items, params, asks, strict=True):
                for _ in range(n):
                    outputs.append(self._one(ids, raw, ask, bool(body.get("return_logprob"))))
        return outputs if is_batch or n > 1 else outputs[0]

    def _inputs(self, body: dict[str, Any]) -> tuple[list[list[int]], bool]:
        text, input_ids = body.get("text"), body.get("input_ids")
        if (text is None) == (input_ids is None):
            raise BadRequest("Either text or input_ids should be provided.")
        if text is not None:
            texts = text if isinstance(text, list) else [text]
            return [self.tokenizer.encode(t) for t in texts], isinstance(text, list)
        batch = bool(input_ids) and isinstance(input_ids[0], list)
        return ([list(map(int, x)) for x in input_ids] if batch else [list(map(int, input_ids))]), batch

    @staticmethod
    def _sampling_list(raw: Any, count: int, is_batch: bool) -> list[dict[str, Any]]:
        if raw is None:
            return [{}] * count
        if isinstance(raw, dict):
            return [raw] * count
        if not is_batch or len(raw) != count:
            raise BadRequest("The length of sampling_params should match the batch size.")
        return list(raw)

    @staticmethod
    def _logprob_asks(body: dict[str, Any], count: int, is_batch: bool) -> list[LogprobAsk]:
        def per_item(key: str, default: Any, nested: bool = False) -> list[Any]:
            value = body.get(key)
            if value is None:
                return [default] * count
            if (
                is_batch
                and isinstance(value, list)
                and (not nested or (value and isinstance(value[0], list)))
            ):
                return value
            return [value] * count

        starts, tops = per_item("logprob_start_len", -1), per_item("top_logprobs_num", 0)
        ids = per_item("token_ids_logprob", [], nested=True)
        return [
            LogprobAsk(int(s if s is not None else -1), int(t or 0), list(i or []))
            for s, t, i in zip(starts, tops, ids, strict=True)
        ]

    @contextlib.contextmanager
    def _queued(self) -> Iterator[None]:
        """Hold the model for one request, counted as waiting until it gets it."""
        with self.stats_lock:
            self.waiting += 1
        with self.lock:
            with self.stats_lock:
                self.waiting -= 1
            yield

    # ---- one sequence

    def _one(
        self, ids: list[int], raw: dict[str, Any], ask: LogprobAsk, want_logprobs: bool
    ) -> dict[str, Any]:
        started = time.perf_counter()
        if self.fork and FORK_KEYS & set(raw):
            return self._forward_only(ids, raw, started)
        sampling = Sampling.parse(raw)
        rid = uuid.uuid4().hex
        cached = min(self.cache.match(ids), max(len(ids) - 1, 0))
        self._track(rid, ids)
        try:
            out, finish, logs = self._decode(rid, ids, sampling, ask, want_logprobs)
        finally:
            with self.stats_lock:
                self.active.pop(rid, None)
        self.cache.insert(ids + out)
        self._count(len(ids), len(out), cached)
        meta = self._meta(rid, finish, len(ids), len(out), cached, started)
        if want_logprobs:
            meta.update(logs)
        return {"text": self._text(out, finish, sampling), "output_ids": out, "meta_info": meta}

    def _track(self, rid: str, ids: list[int]) -> None:
        with self.stats_lock:
            self.active[rid] = list(ids)

    def _count(self, prompt: int, generated: int, cached: int) -> None:
        with self.stats_lock:
            self.counters["prompt"] += prompt
            self.counters["generation"] += generated
            self.counters["cached"] += cached

    @staticmethod
    def _meta(
        rid: str, finish: dict[str, Any], prompt: int, completion: int, cached: int, t0: float
    ) -> dict[str, Any]:
        return {
            "id": rid,
            "finish_reason": finish,
            "prompt_tokens": prompt,
            "weight_version": "default",
            "completion_tokens": completion,
            "cached_tokens": cached,
            "e2e_latency": time.perf_counter() - t0,
        }

    def _decode(
        self, rid: str, ids: list[int], sampling: Sampling, ask: LogprobAsk, want: bool
    ) -> tuple[list[int], dict[str, Any], dict[str, Any]]:
        generator = torch.Generator().manual_seed(int(sampling.seed)) if sampling.seed is not None else None
        logs: dict[str, Any] = {
            k: [] for k in ("output_token_logprobs", "output_top_logprobs", "output_token_ids_logprobs")
        }
        logits, past = self._forward(ids, None, full=want and ask.start >= 0)
        if want:
            logs.update(self._input_logprobs(ids, logits, ask))
        out: list[int] = []
        for _ in range(sampling.max_new_tokens):
            step_logprobs = torch.log_softmax(logits[-1].float(), dim=-1)
            token = self._pick(logits[-1].float(), sampling, generator)
            out.append(token)
            self.active[rid].append(token)
            if want:
                self._output_logprobs(logs, step_logprobs, token, ask)
            finish = self._finished(out, sampling)
            if finish is not None:
                return out, finish, logs
            logits, past = self._forward([token], past)
        return out, {"type": "length", "length": sampling.max_new_tokens}, logs

    def _forward(self, ids: list[int], past: Any, full: bool = False) -> tuple[torch.Tensor, Any]:
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids]), past_key_values=past, use_cache=True)
        logits = out.logits[0] if full else out.logits[0, -1:]
        return logits, out.past_key_values

    @staticmethod
    def _pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
        if sampling.temperature < 1e-6 or sampling.top_k == 1:
            return int(logits.argmax())
        probs = torch.softmax(logits / sampling.temperature, dim=-1)
        if sampling.top_k > 0:
            cut = torch.topk(probs, min(sampling.top_k, probs.numel())).values[-1]
            probs = torch.where(probs >= cut, probs, torch.zeros_like(probs))
        return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))

    def _finished(self, out: list[int], sampling: Sampling) -> dict[str, Any] | None:
        token = out[-1]
        if (token in self.eos_ids and not sampling.ignore_eos) or token in sampling.stop_token_ids:
            return {"type": "stop", "matched": token}
        text = self.tokenizer.decode(out, skip_special_tokens=sampling.skip_special_tokens)
        for stop in sampling.stop:
            if stop and stop in text:
                return {"type": "stop", "matched": stop}
        return None

    def _text(self, out: list[int], finish: dict[str, Any], sampling: Sampling) -> str:
        text = self.tokenizer.decode(out, skip_special_tokens=sampling.skip_special_tokens)
        matched = finish.get("matched")
        if isinstance(matched, str):
            cut = text.index(matched)
            return text[: cut + len(matched)] if sampling.no_stop_trim else text[:cut]
        return text

    # ---- logprobs

    def _input_logprobs(self, ids: list[int], logits: torch.Tensor, ask: LogprobAsk) -> dict[str, Any]:
        tokens, tops, by_id = [], [], []
        logprobs = torch.log_softmax(logits.float(), dim=-1) if ask.start >= 0 else None
        for pos in range(max(ask.start, 0), len(ids)) if logprobs is not None else []:
            if pos == 0:
                tokens.append([None, ids[0], None])
                tops.append(None)
                by_id.append(None)
                continue
            row = logprobs[pos - 1]
            tokens.append(_entry(row, ids[pos]))
            tops.append(self._top(row, ask.top))
            by_id.append([_entry(row, t) for t in ask.ids] if ask.ids else None)
        return {"input_token_logprobs": tokens, "input_top_logprobs": tops, "input_token_ids_logprobs": by_id}

    def _output_logprobs(self, logs: dict[str, Any], row: torch.Tensor, token: int, ask: LogprobAsk) -> None:
        logs["output_token_logprobs"].append(_entry(row, token))
        logs["output_top_logprobs"].append(self._top(row, ask.top))
        logs["output_token_ids_logprobs"].append([_entry(row, t) for t in ask.ids] if ask.ids else None)

    @staticmethod
    def _top(row: torch.Tensor, k: int) -> list[list[Any]] | None:
        if k <= 0:
            return None
        values, indices = torch.topk(row, min(k, row.numel()))
        return [[float(v), int(i), None] for v, i in zip(values, indices, strict=True)]

    # ---- the reference fork

    def _forward_only(self, ids: list[int], raw: dict[str, Any], started: float) -> dict[str, Any]:
        wanted = raw.get("logits_require_id")
        if not isinstance(wanted, list) or len(wanted) != 3:
            raise BadRequest("logits_require_id must be [good, bad, step tag] token ids")
        good, bad, tag = (int(x) for x in wanted)
        logits, _ = self._forward(ids, None, full=True)
        pair = torch.softmax(logits[:, [good, bad]].float(), dim=-1)[:, 0]
        scores = [float(pair[i]) for i, token in enumerate(ids) if token == tag]
        cached = min(self.cache.match(ids), max(len(ids) - 1, 0))
        self.cache.insert(ids)
        self._count(len(ids), 0, cached)
        meta = self._meta(uuid.uuid4().hex, {"type": "length", "length": 0}, len(ids), 0, cached, started)
        return {"text": "", "output_ids": [], "scores": scores, "meta_info": {**meta, "scores": scores}}

    # ---- the other endpoints

    def model_info(self) -> dict[str, Any]:
        return {
            "model_path": self.path,
            "tokenizer_path": self.path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
        }

    def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string")
        tokens = self.tokenizer.encode(prompt, add_special_tokens=bool(body.get("add_special_tokens", True)))
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.context_len}

    def metrics(self) -> str:
        with self.stats_lock:
            used = union_size(list(self.active.values()))
            running, waiting, counters = len(self.active), self.waiting, dict(self.counters)
        hit_rate = counters["cached"] / counters["prompt"] if counters["prompt"] else 0.0
        rows = [
            ("sglang:num_used_tokens", "gauge", "The number of used tokens", used),
            ("sglang:token_usage", "gauge", "The token usage", used / self.max_total_tokens),
            ("sglang:cache_hit_rate", "gauge", "The cache hit rate", hit_rate),
            ("sglang:num_running_reqs", "gauge", "The number of running requests", running),
            ("sglang:num_queue_reqs", "gauge", "The number of requests in the waiting queue", waiting),
            (
                "sglang:prompt_tokens_total",
                "counter",
                "Number of prefill tokens processed.",
                counters["prompt"],
            ),
            (
                "sglang:generation_tokens_total",
                "counter",
                "Number of generation tokens processed.",
                counters["generation"],
            ),
        ]
        label = json.dumps(self.path)
        return "".join(
            f"# HELP {name} {text}\n# TYPE {name} {kind}\n{name}{{model_name={label}}} {float(value)}\n"
            for name, kind, text, value in rows
        )


# --------------------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    """Routes SGLang's endpoints to the engine; FastAPI-style 404 for anything else."""

    engine: Engine
    tokenize: bool = True
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # Headers and body are two writes; without TCP_NODELAY the body waits out the client's
        # delayed ACK (~40 ms per response).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        routes = {
            "/health": lambda: self._send(HTTPStatus.OK, b"", "text/plain"),
            "/get_model_info": lambda: self._json(HTTPStatus.OK, self.engine.model_info()),
            "/metrics": lambda: self._send(
                HTTPStatus.OK, self.engine.metrics().encode(), "text/plain; version=0.0.4"
            ),
        }
        routes.get(self.path.split("?")[0], self._not_found)()

    def do_POST(self) -> None:
        routes = {"/generate": self.engine.generate}
        if self.tokenize:
            routes["/tokenize"] = self.engine.tokenize
        route = routes.get(self.path.split("?")[0])
        body = self._body()
        if route is None:
            return self._not_found()
        try:
            result = route(body)
        except (BadRequest, KeyError, TypeError, ValueError) as exc:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": {"message": str(exc)}})
        self._json(HTTPStatus.OK, result)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            return json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError:
            return {}

    def _not_found(self) -> None:
        self._json(HTTPStatus.NOT_FOUND, {"detail": "Not Found"})

    def _json(self, status: HTTPStatus, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: HTTPStatus, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def serve(model: str, host: str, port: int, fork: bool = False, tokenize: bool = True) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"engine": Engine(model, fork=fork), "tokenize": tokenize})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fork", action="store_true", help="also speak the reference fork's forward_only")
    parser.add_argument("--no-tokenize", action="store_true", help="no /tokenize (older SGLang releases)")
    args = parser.parse_args()
    serve(args.model, args.host, args.port, args.fork, not args.no_tokenize).serve_forever()


if __name__ == "__main__":
    main()

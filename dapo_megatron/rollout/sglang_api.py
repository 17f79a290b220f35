"""Every SGLang (and sglang-router) HTTP payload this project sends or reads, in one module.

Pinned against SGLang ``0.5.23`` (the registry's wheel; its Python source is the reference) and
sglang-router ``0.3.2``, and exercised against both running servers in ``tests/test_sglang_real.py``.
Facts this module relies on:

* ``srt/entrypoints/http_server.py`` - routes and status codes; failures answer HTTP 400 with
  ``{"success": false, "message"}`` (weight updates) or ``{"error": {"message"}}`` (generate).
  ``--api-key`` makes every route ask for ``Authorization: Bearer <key>``.
* ``srt/managers/io_struct.py`` - ``GenerateReqInput`` (``input_ids``, ``sampling_params`` with ``n`` and
  ``sampling_seed``, ``return_logprob``, ``rid``, ``return_routed_experts`` for MoE routing replay),
  ``AbortReq`` (``rid``, ``abort_all``), ``PauseGenerationReqInput`` (``mode``: abort | retract |
  in_place), ``InitWeightsUpdateGroupReqInput``, ``UpdateWeightsFromDistributedReqInput``
  (``names``/``dtypes``/``shapes``, ``load_format`` ``flattened_bucket`` for one broadcast per bucket,
  ``weight_version``), ``UpdateWeightsFromTensorReqInput`` (``serialized_named_tensors``: one base64
  ForkingPickler payload per engine TP rank), ``UpdateWeightVersionReqInput`` (``new_version``),
  ``Begin/EndWeightUpdateReqInput``, ``Release/ResumeMemoryOccupationReqInput`` (``tags``).
* **0.5.23's update protocol**: ``update_weights_from_tensor`` and ``update_weights_from_distributed``
  are refused unless they run between ``POST /begin_weight_update`` and ``POST /end_weight_update``.
* The generate response: ``output_ids`` and ``meta_info`` with ``id``, ``finish_reason``,
  ``weight_version`` (a string), ``weight_versions`` (``[{"version", "start", "end"}]`` token ranges),
  and ``output_token_logprobs`` as ``[logprob, token_id, null]``; with ``n > 1`` the body is a list.
* ``srt/utils/common.py`` - ``MultiprocessingSerializer``: base64 of a ``ForkingPickler`` pickle, read
  back by an unpickler that admits torch's tensor-rebuild functions. CUDA tensors travel as IPC
  handles; CPU tensors must use torch's ``file_system`` sharing strategy (the default fd passing needs
  the sender's multiprocessing auth key and kills the server).
* ``srt/weight_sync/tensor_bucket.py`` - the ``flattened_bucket`` layout: the raw bytes of every tensor
  concatenated in order (uint8), each tensor at a byte offset aligned to its dtype.
* sglang-router re-serialises ``/generate`` bodies through its own structs, so only fields it knows
  survive (``rid`` a single string; one ``sampling_params`` dict, not a list). It forwards ``/generate``
  and ``/flush_cache``; it does **not** forward abort, pause/continue, weight updates, versions or
  memory release, so those go to each worker directly. Workers are added with ``POST /workers``.

No SGLang code is imported here; these are plain dicts.
"""

from __future__ import annotations

import base64
import io
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from dapo_megatron.rollout.base import Completion, EngineError, SamplingParams

SGLANG_VERSION = "0.5.23"
SGLANG_ROUTER_VERSION = "0.3.2"
DEFAULT_GROUP_NAME = "weight_update_group"  # SGLang's default group_name

Json = Dict[str, Any]


class SGLangRequestError(EngineError):
    """The server answered a request with an error body or a failure flag."""


# ----------------------------------------------------------------------------- /generate
def sampling_params_payload(params: SamplingParams) -> Json:
    """``sampling_params`` of ``GenerateReqInput``. ``no_stop_trim`` keeps the stop token in the text
    too (``output_ids`` always has it); ``skip_special_tokens=False`` so the text matches the ids."""
    out: Json = {
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "max_new_tokens": params.max_new_tokens,
        "no_stop_trim": True,
        "skip_special_tokens": False,
    }
    if params.stop_token_ids:
        out["stop_token_ids"] = list(params.stop_token_ids)
    if params.seed is not None:
        out["sampling_seed"] = int(params.seed)
    return out


def generate_request(
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    rid: Optional[str] = None,
    return_routed_experts: bool = False,
) -> Json:
    """One prompt, ``params.n`` samples, output logprobs only (``logprob_start_len=-1``).
    ``return_routed_experts`` asks an MoE server for the experts each token was routed to."""
    body: Json = {
        "input_ids": [int(t) for t in prompt_ids],
        "sampling_params": sampling_params_payload(params),
        "return_logprob": True,
        "logprob_start_len": -1,
        "stream": False,
    }
    if rid is not None:
        body["rid"] = rid
    if return_routed_experts:
        body["return_routed_experts"] = True
    return body


def _version_int(value: Any) -> int:
    """SGLang's ``weight_version`` is a string (default "default"); ours are stringified ints."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def parse_completion(item: Json) -> Completion:
    """One response element -> :class:`Completion`. Raises :class:`SGLangRequestError` on an error
    item or when logprobs are missing or do not line up with ``output_ids``."""
    if "error" in item:
        raise SGLangRequestError(f"sglang generate error: {item['error'].get('message')}")
    meta = item["meta_info"]
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind not in ("stop", "length", "abort"):
        raise SGLangRequestError(f"unexpected finish_reason {reason!r}")
    token_ids = [int(t) for t in item["output_ids"]]
    triples = meta.get("output_token_logprobs")
    if triples is None:
        raise SGLangRequestError("response has no output_token_logprobs; send return_logprob=true")
    if [int(t[1]) for t in triples] != token_ids:
        raise SGLangRequestError("output_token_logprobs token ids do not match output_ids")
    return Completion(
        token_ids,
        [float(t[0]) for t in triples],
        kind,
        weight_version=_version_int(meta.get("weight_version")),
        meta=_completion_meta(meta),
    )


def _completion_meta(meta: Json) -> Json:
    """What a :class:`Completion` keeps of ``meta_info``: the request id, and when present the per-token
    weight-version ranges (partial rollouts across updates) and the routed experts (MoE replay)."""
    out: Json = {"id": meta.get("id")}
    for key in ("weight_versions", "routed_experts"):
        if meta.get(key) is not None:
            out[key] = meta[key]
    return out


def decode_routed_experts(encoded: str, positions: int, topk: int) -> List[List[List[int]]]:
    """SGLang's ``meta_info["routed_experts"]`` -> nested lists ``[positions][layers][topk]``.

    The server sends base64 of an int32 array ``[positions, num_hidden_layers, topk]``, C order
    (``srt/state_capturer/routed_experts.py``, encoded in ``detokenizer_manager``), covering positions
    ``[routed_experts_start_len, seqlen - 1)``: from 0, every token the model read, which is
    ``prompt + response - 1`` (the convention of ``Completion.meta``). Raises
    :class:`SGLangRequestError` when the size does not factor that way."""
    raw = base64.b64decode(encoded)
    size = len(raw) // 4
    if len(raw) % 4 or positions < 1 or topk < 1 or size == 0 or size % (positions * topk):
        raise SGLangRequestError(
            f"routed_experts: {size} ids do not split into {positions} positions x layers x top-{topk} "
            "(a server started without --enable-return-routed-experts, or another model?)"
        )
    return torch.frombuffer(bytearray(raw), dtype=torch.int32).reshape(positions, -1, topk).tolist()


def parse_generate_response(body: Any, n: int) -> List[Completion]:
    """A ``/generate`` body for one prompt with ``n`` samples (a dict when n == 1, else a list)."""
    if isinstance(body, dict) and "error" in body:
        raise SGLangRequestError(f"sglang generate error: {body['error'].get('message')}")
    items = body if isinstance(body, list) else [body]
    if len(items) != n:
        raise SGLangRequestError(f"expected {n} completions, got {len(items)}")
    return [parse_completion(it) for it in items]


def parse_success(body: Any, what: str) -> str:
    """``{"success": bool, "message": str}`` bodies: the message, or raise on ``success: false``."""
    if not isinstance(body, dict) or not body.get("success", False):
        msg = body.get("message") if isinstance(body, dict) else body
        raise SGLangRequestError(f"sglang {what} failed: {msg}")
    return str(body.get("message", ""))


# ----------------------------------------------------------------------------- control plane
def auth_headers(api_key: Optional[str]) -> Dict[str, str]:
    """The header a server (or router) started with ``--api-key`` asks for on every route; none without a key."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def abort_request(*, rid: Optional[str] = None, abort_all: bool = False) -> Json:
    """``AbortReq``: one request id, or every request (``rid`` "" as SGLang defaults it)."""
    return {"rid": rid or "", "abort_all": bool(abort_all)}


def pause_generation(mode: str = "abort") -> Json:
    """``PauseGenerationReqInput``: ``abort`` returns in-flight requests as aborted (the RL default),
    ``retract`` re-queues them, ``in_place`` freezes them with their KV cache."""
    if mode not in ("abort", "retract", "in_place"):
        raise ValueError(f"pause mode must be abort, retract or in_place, got {mode!r}")
    return {"mode": mode}


def continue_generation() -> Json:
    return {}


def release_memory_occupation(tags: Optional[Sequence[str]] = None) -> Json:
    """``tags``: subset of ``["weights", "kv_cache"]``; None releases both."""
    return {"tags": list(tags) if tags is not None else None}


def resume_memory_occupation(tags: Optional[Sequence[str]] = None) -> Json:
    return {"tags": list(tags) if tags is not None else None}


# ----------------------------------------------------------------------------- weight updates
def init_weights_update_group(
    *,
    master_address: str,
    master_port: int,
    rank_offset: int,
    world_size: int,
    group_name: str = DEFAULT_GROUP_NAME,
    backend: str = "nccl",
) -> Json:
    """``InitWeightsUpdateGroupReqInput``: the engine's TP ranks join as ``rank_offset + tp_rank``."""
    return {
        "master_address": master_address,
        "master_port": int(master_port),
        "rank_offset": int(rank_offset),
        "world_size": int(world_size),
        "group_name": group_name,
        "backend": backend,
    }


def begin_weight_update() -> Json:
    """``BeginWeightUpdateReqInput``: opens the update session (0.5.23) for every runner."""
    return {}


def end_weight_update() -> Json:
    """``EndWeightUpdateReqInput``: closes the session; the server post-processes the new weights."""
    return {}


def update_weight_version(version: int) -> Json:
    """``UpdateWeightVersionReqInput``. The engine is paused and flushed when this is sent, so there is
    nothing to abort; aborting here would also cut requests the caller still counts as its own."""
    return {"new_version": str(int(version)), "abort_all_requests": False}


def update_weights_from_distributed(
    metas: Sequence[Any],
    *,
    version: Optional[int],
    group_name: str = DEFAULT_GROUP_NAME,
    flush_cache: bool = True,
    flattened: bool = True,
) -> Json:
    """``UpdateWeightsFromDistributedReqInput`` for one bucket; ``metas`` are ``TensorMeta``-like
    (``name``, ``dtype`` as "bfloat16", ``shape``), in the order the sender lays them out. ``flattened``:
    the bucket arrives as one broadcast of its concatenated bytes (:func:`flatten_bucket`), else as one
    broadcast per tensor. ``version`` None: the bucket does not stamp the engine (a sync whose version
    is stamped once, after its last bucket, by ``update_weight_version``)."""
    return {
        "names": [m.name for m in metas],
        "dtypes": [m.dtype for m in metas],
        "shapes": [list(m.shape) for m in metas],
        "group_name": group_name,
        "flush_cache": flush_cache,
        "abort_all_requests": False,
        "weight_version": None if version is None else str(int(version)),
        "load_format": "flattened_bucket" if flattened else None,
    }


def flatten_bucket(named_tensors: Sequence[Tuple[str, torch.Tensor]]) -> torch.Tensor:
    """The raw bytes of every tensor, concatenated in order (uint8 ``[total]``): SGLang's
    ``flattened_bucket`` layout. Each tensor must start at an offset aligned to its dtype (the server
    refuses unaligned ones), so mixed dtypes are checked here, before anything is sent."""
    if not named_tensors:
        raise ValueError("cannot flatten an empty bucket")
    parts, offset = [], 0
    for name, t in named_tensors:
        if offset % t.element_size():
            raise ValueError(f"{name}: byte offset {offset} is not aligned to {t.dtype}; order the bucket by dtype")
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        parts.append(raw)
        offset += raw.numel()
    return torch.cat(parts)


def serialize_named_tensors(named_tensors: Sequence[Tuple[str, torch.Tensor]]) -> str:
    """``[(name, tensor)]`` as SGLang's ``MultiprocessingSerializer`` writes it: base64 of a
    ``ForkingPickler`` pickle. The tensors are shared, not copied into the payload: CUDA tensors by IPC
    handle, CPU tensors through shared-memory files (torch's ``file_system`` strategy, set here for this
    process). The tensors must stay alive until the server has answered."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing as torch_mp

    if any(not t.is_cuda for _, t in named_tensors) and torch_mp.get_sharing_strategy() != "file_system":
        torch_mp.set_sharing_strategy("file_system")
    buf = io.BytesIO()
    ForkingPickler(buf).dump([(name, t.detach()) for name, t in named_tensors])
    return base64.b64encode(buf.getvalue()).decode("ascii")


def update_weights_from_tensor(payload: str, *, version: Optional[int], tp_size: int, flush_cache: bool = True) -> Json:
    """``UpdateWeightsFromTensorReqInput`` (default load format: a list of named tensors) with one copy
    of ``payload`` (:func:`serialize_named_tensors`) per engine TP rank; ``version`` None: no stamp."""
    return {
        "serialized_named_tensors": [payload for _ in range(tp_size)],
        "load_format": None,
        "flush_cache": flush_cache,
        "abort_all_requests": False,
        "weight_version": None if version is None else str(int(version)),
    }


# ----------------------------------------------------------------------------- sglang-router
def router_add_worker(url: str, api_key: Optional[str] = None) -> Json:
    """``POST /workers`` body (router 0.3.x; the old ``/add_worker`` is gone). ``api_key``: the key the
    router presents to this worker (without it the router warns that it talks to the worker unauthenticated)."""
    return {"url": url, "api_key": api_key} if api_key else {"url": url}


def parse_router_add_worker(body: Json) -> str:
    """The router's worker id (a UUID) from the 202 answer to ``POST /workers``."""
    if body.get("status") != "accepted" or not body.get("worker_id"):
        raise SGLangRequestError(f"router refused the worker: {body}")
    return str(body["worker_id"])


def parse_router_workers(body: Json) -> Dict[str, Json]:
    """``GET /workers`` -> ``{url: worker_info}`` (info has ``id``, ``is_healthy``, ...)."""
    return {w["url"]: w for w in body.get("workers", [])}

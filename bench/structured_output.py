"""The cost of structured output: decode tokens/s with a JSON-schema constraint against without.

It builds a random-weight Qwen2.5-VL on the CPU whose tokenizer is as large as Qwen's (151,643
text tokens, so the grammar's per-token mask costs what it costs for the real model) and whose
output layer has Qwen's 152,064 rows, and serves it with the service's own `QwenVLModel`. Each
round times the same greedy decode without a grammar, then held to `RECORDS_SCHEMA` (an array
that can't close within the budget, so the grammar is live at every token); runs interleave so
both see the same machine state. The decode rate is (n - 1) tokens over the time of n minus the
time of 1, as in bench/gpu.py. It also times compiling a new schema and fetching a cached one.

A third path is a tool call the request names (`tool_choice: {"type": "function", ...}`): the
same decode held to the grammar of a call whose argument is those records, so it is live at
every token too. It also times compiling the grammar of a call among ten functions, as an agent
offers them, new and cached.

    uv run python bench/structured_output.py                 # about 2 minutes
    uv run python bench/structured_output.py --tokens 256 --rounds 5 --hidden 1024
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

QWEN_TEXT_TOKENS = 151_643


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from gpu import RECORDS_SCHEMA, decode_rate
    from hunyuan_service.models import grammar
    from hunyuan_service.models.base import JobContext
    from hunyuan_service.models.qwen_vl import QwenVLModel
    from hunyuan_service.models.tiny import QwenVLShape, build_qwen_vl
    from hunyuan_service.models.types import ChatMessage, Image2TextInput
    from hunyuan_service.settings import Settings

    torch.manual_seed(0)
    shape = QwenVLShape(
        hidden_size=args.hidden,
        layers=args.layers,
        heads=args.hidden // 64,
        kv_heads=2,
        intermediate_size=args.hidden * 3,
        vocab_size=152_064,
        word_tokens=QWEN_TEXT_TOKENS - 256,
    )
    started = time.perf_counter()
    model, processor = build_qwen_vl(shape)
    model.generation_config.eos_token_id = None  # random weights: time a fixed length
    settings = Settings(_env_file=None, model_type="image2text", model_id="tiny", device="cpu")
    served = QwenVLModel(settings)
    served.adopt(model, processor)
    built_s = time.perf_counter() - started
    print(f"built in {built_s:.1f} s; a tokenizer of {len(processor.tokenizer)} tokens")

    message = ChatMessage("user", "List every item on the receipt as JSON records.")

    def run(tokens: int, held: Any) -> float:
        request = Image2TextInput((message,), max_new_tokens=tokens, grammar=held)
        begin = time.perf_counter()
        output = served.infer(request, JobContext())
        assert output.completion_tokens == tokens, output
        return time.perf_counter() - begin

    started = time.perf_counter()
    held = grammar.compile_response_format("json_schema", RECORDS_SCHEMA, "records")
    compile_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    grammar.compile_response_format("json_schema", RECORDS_SCHEMA, "records")
    cached_ms = (time.perf_counter() - started) * 1000

    functions = tool_functions()
    started = time.perf_counter()
    compile_call(functions)
    call_compile_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    compile_call(functions)
    call_cached_ms = (time.perf_counter() - started) * 1000
    call = compile_call(functions[-1:])  # the records function, named

    n = args.tokens
    paths = {"free": None, "held": held, "call": call}
    for path in paths.values():
        run(n, path)  # warm every path
    times: dict[str, list[float]] = {key: [] for key in [*paths, "first"]}
    for _ in range(args.rounds):
        times["first"].append(run(1, None))
        for key, path in paths.items():
            times[key].append(run(n, path))
    first = statistics.median(times["first"])
    rates = {key: decode_rate(n, statistics.median(times[key]), first) for key in paths}
    ratio = rates["held"] / rates["free"]  # None when one of them fell back to the whole call
    call_ratio = rates["call"] / rates["free"]
    result = {
        "tokens": n,
        "rounds": args.rounds,
        "shape": f"hidden {args.hidden}, {args.layers} layers, vocab 152064",
        "free_tok_per_s": round(rates["free"].per_s, 2),
        "held_tok_per_s": round(rates["held"].per_s, 2),
        "call_tok_per_s": round(rates["call"].per_s, 2),
        "rates_measure": sorted({rate.kind for rate in rates.values()}),
        "ratio": None if ratio is None else round(ratio, 3),
        "call_ratio": None if call_ratio is None else round(call_ratio, 3),
        "schema_compile_ms": round(compile_ms, 2),
        "cached_compile_ms": round(cached_ms, 3),
        "ten_tools_compile_ms": round(call_compile_ms, 2),
        "ten_tools_cached_ms": round(call_cached_ms, 3),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    print(
        f"\nconstrained decode: {result['ratio']}x the unconstrained rate "
        f"({rates['held'].per_s:.1f} vs {rates['free'].per_s:.1f} tok/s, {result['rates_measure']})"
    )
    print(
        f"a named tool call: {result['call_ratio']}x the unconstrained rate "
        f"({rates['call'].per_s:.1f} tok/s); ten tools' grammar compiled in "
        f"{call_compile_ms:.1f} ms, {call_cached_ms:.3f} ms cached"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def tool_functions() -> list[Any]:
    """Ten functions, as an agent offers them: nine small ones, and last one whose argument is
    bench/gpu.py's records, which can't close within the budget."""
    from gpu import RECORDS_SCHEMA
    from hunyuan_service.api.tool_calls import Function

    small = {
        "type": "object",
        "properties": {
            "query": {"type": "string", "maxLength": 80},
            "limit": {"type": "integer", "minimum": 1, "maximum": 50},
        },
        "required": ["query"],
        "additionalProperties": False,
    }
    functions = [Function(f"lookup_{i}", f"Looks up kind {i}.", small) for i in range(9)]
    records = {
        "type": "object",
        "properties": {"records": RECORDS_SCHEMA},
        "required": ["records"],
        "additionalProperties": False,
    }
    return [*functions, Function("save_records", "Saves the receipt's records.", records)]


def compile_call(functions: list[Any]) -> Any:
    """A required call's grammar, compiled as the chat API compiles it."""
    from hunyuan_service.api.tool_calls import call_grammar
    from hunyuan_service.models.grammar import compile_tool_calls

    lark = call_grammar(functions, parallel=True, tag_tokens=False)
    schemas = [(i, f.name, f.parameters) for i, f in enumerate(functions)]
    return compile_tool_calls(schemas, lark)


if __name__ == "__main__":
    main()

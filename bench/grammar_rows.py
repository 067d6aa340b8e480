"""The CPU cost of many constrained rows' grammar masks, one row at a time or in parallel.

The continuous decoder computes each grammar row's mask for the next token on the CPU while the
device runs the step (`RowSampler.prepare`), one row after another. llguidance can also fill
many rows' masks from a thread pool of its own (`LLExecutor`). This script builds a tokenizer of
Qwen's size (151,643 text tokens, as `bench/structured_output.py`), holds N matchers to
bench/gpu.py's `RECORDS_SCHEMA`, feeds them the tokens of a valid answer, and times each step's
masks both ways.

    uv run python bench/grammar_rows.py              # about 15 s
    uv run python bench/grammar_rows.py --rows 1,8,32,64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QWEN_TEXT_TOKENS = 151_643


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,8,32,64")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    import torch
    from llguidance import LLExecutor, LLMatcher

    from gpu import RECORDS_SCHEMA
    from hunyuan_service.models.grammar import compile_response_format
    from hunyuan_service.models.qwen_vl import _grammar_tokenizer
    from hunyuan_service.models.tiny import QwenVLShape, build_qwen_vl

    shape = QwenVLShape(vocab_size=152_064, word_tokens=QWEN_TEXT_TOKENS - 256)
    model, processor = build_qwen_vl(shape)
    tokenizer = _grammar_tokenizer(model, processor.tokenizer)
    grammar = compile_response_format("json_schema", RECORDS_SCHEMA, "records").grammar
    record = '{"name":"apple pie with cream","qty":3,"price":4.5,"kind":"food"},'
    answer = processor.tokenizer.encode("[" + record * 16)[: args.steps]
    words = (152_064 + 31) // 32
    executor = LLExecutor()
    print(f"{len(answer)} steps of RECORDS_SCHEMA; {os.cpu_count()} CPUs")
    print("| rows | one at a time, ms a step | LLExecutor, ms a step | ratio |")
    print("| --- | --- | --- | --- |")
    for rows in (int(n) for n in args.rows.split(",")):
        medians = {}
        for way in ("alone", "pool"):
            matchers = [LLMatcher(tokenizer, grammar, log_level=0) for _ in range(rows)]
            bitmask = torch.full((rows, words), -1, dtype=torch.int32)
            times = []
            for token in answer:
                started = time.perf_counter()
                if way == "alone":
                    for row, matcher in enumerate(matchers):
                        matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), words * 4)
                else:
                    pairs = [(matcher, row) for row, matcher in enumerate(matchers)]
                    executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), words * 4, rows)
                times.append(time.perf_counter() - started)
                assert all(matcher.consume_token(token) for matcher in matchers)
            medians[way] = 1000 * statistics.median(times)
        ratio = medians["pool"] / medians["alone"]
        print(f"| {rows} | {medians['alone']:.3f} | {medians['pool']:.3f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()

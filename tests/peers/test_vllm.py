"""vLLM reads deltaw's adapters: its CPU build serves deltaw's PEFT directory unchanged (at start-up and through
its runtime load route), with deltaw's greedy answers and loss as often as the two base models agree."""

from __future__ import annotations

import json
import urllib.request

from deltaw.tools.eval import evaluate
from deltaw.tools.eval_backends import ServerBackend, Target
from tests.peers.conftest import MAX_NEW_TOKENS, assert_as_often_as_the_bases, compare
from tests.peers.engines import vllm_server, vllm_version


def test_vllm_serves_deltaws_peft_directory_as_deltaw(pirate, reference, hf_dir):
    ours, examples, tokenizer = reference
    with vllm_server(hf_dir, {"pirate": pirate}) as url:
        backend = ServerBackend(url, concurrency=4)
        report = evaluate(backend, examples, backend.targets(["pirate"]), tokenizer, MAX_NEW_TOKENS)
        body = json.dumps({"lora_name": "pirate2", "lora_path": str(pirate)}).encode()
        request = urllib.request.Request(f"{url}/v1/load_lora_adapter", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            assert response.status == 200
        loaded = evaluate(backend, examples[:4], [Target("pirate2", fields={"model": "pirate2"})], tokenizer,
                          MAX_NEW_TOKENS)
    assert [s.answer for s in loaded.targets[0].examples] == [s.answer for s in report.targets[1].examples[:4]]
    base, adapted = compare(f"vLLM {vllm_version()} CPU, fp32, deltaw's PEFT directory", report, ours)
    assert_as_often_as_the_bases(base, adapted)
    floor = abs(base.loss - base.deltaw_loss)
    assert abs(adapted.loss - adapted.deltaw_loss) <= max(2 * floor, 1e-3), (base, adapted)

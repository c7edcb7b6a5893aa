"""How a pipeline-parallel step is cut into micro-batches (no processes: the pure splitting)."""
from types import SimpleNamespace

import pytest

from octavo.distributed.step import from_wire, to_wire
from octavo.distributed.worker import RankInfo, _micro_batches
from octavo.models.layers.parallel_state import pp_layer_range
from octavo.scheduler import ScheduledRequest, SchedulerOutput


def _step(sizes):
    return SchedulerOutput([ScheduledRequest(SimpleNamespace(request_id=str(i)), n, 0)
                            for i, n in enumerate(sizes)])


@pytest.mark.parametrize("sizes,count,expected", [
    ([4, 4, 4, 4], 2, [[4, 4], [4, 4]]),          # equal halves
    ([16, 1, 1, 1], 2, [[16], [1, 1, 1]]),        # a long prefill alone in the first
    ([1, 1, 1], 4, [[1], [1], [1]]),              # never more micro-batches than requests
    ([5], 2, [[5]]),                              # one request: one micro-batch
    ([3, 3, 3, 3, 3, 3], 3, [[3, 3], [3, 3], [3, 3]]),
])
def test_micro_batches_are_contiguous_balanced_and_at_most_pp(sizes, count, expected):
    groups = _micro_batches(_step(sizes), count)
    assert [[s.num_new_tokens for s in g.scheduled] for g in groups] == expected
    order = [s.request.request_id for g in groups for s in g.scheduled]
    assert order == [str(i) for i in range(len(sizes))]      # sampling order is kept


def test_rank_layout_and_layer_ranges():
    infos = [RankInfo(r, 2, 2) for r in range(4)]
    assert [(i.pp_rank, i.tp_rank) for i in infos] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [i.returns_output for i in infos] == [False, False, True, False]
    assert [pp_layer_range(4, r, 2) for r in range(2)] == [(0, 2), (2, 4)]
    with pytest.raises(ValueError, match="5 layers do not divide into 2 pipeline stages"):
        pp_layer_range(5, 0, 2)


def test_a_step_on_the_wire_carries_only_its_tokens():
    req = SimpleNamespace(request_id="r", all_token_ids=list(range(100, 140)), num_tokens=40,
                          block_ids=[3, 7, 9], num_prompt_tokens=30, prompt_logprobs=2,
                          prompt_token_ids=list(range(100, 130)))
    wire = to_wire(SchedulerOutput([ScheduledRequest(req, 8, 24)]))
    (got,) = from_wire(wire).scheduled
    assert got.request.all_token_ids[24:32] == list(range(124, 132))
    assert len(got.request.all_token_ids.tokens) == 8
    # prompt-logprob targets: prompt positions 25 .. 29 (the prompt ends at 30)
    assert got.request.prompt_token_ids[25:30] == list(range(125, 130))
    assert got.num_new_tokens == 8 and got.start == 24 and not got.samples

"""The n-gram proposer continues the most recent earlier occurrence of the longest suffix."""
import pytest

from octavo.spec_decode.ngram import NgramProposer


@pytest.mark.parametrize("ids, n_max, n_min, k, expected", [
    ([1, 2, 3, 4, 1, 2], 2, 1, 3, [3, 4, 1]),          # suffix [1, 2] seen at the start
    ([5, 6, 7, 5, 6, 8, 5, 6], 2, 1, 2, [8, 5]),       # two earlier [5, 6]: the later one wins
    ([9, 1, 2, 3, 7, 3], 3, 1, 4, [7, 3]),             # only n=1 matches; continuation runs out
    ([9, 1, 2, 3, 7, 3], 3, 2, 4, []),                 # ... and n=1 is not allowed
    ([4, 4, 4, 4], 3, 1, 2, [4]),                      # overlapping occurrence, one token left
    ([1, 2, 3], 2, 1, 2, []),                          # nothing repeats
    ([7], 2, 1, 2, []),                                # too short to look anything up
])
def test_proposals(ids, n_max, n_min, k, expected):
    assert NgramProposer(k, n_max, n_min).propose(ids) == expected


def test_longer_match_preferred_over_more_recent_shorter():
    # [1, 2] occurs once (-> 3); [2] alone most recently precedes 9
    ids = [1, 2, 3, 0, 2, 9, 0, 1, 2]
    assert NgramProposer(1, 2).propose(ids) == [3]
    assert NgramProposer(1, 1).propose(ids) == [9]


@pytest.mark.parametrize("kwargs", [dict(num_speculative_tokens=0, prompt_lookup_max=2),
                                    dict(num_speculative_tokens=2, prompt_lookup_max=1,
                                         prompt_lookup_min=2),
                                    dict(num_speculative_tokens=2, prompt_lookup_max=0,
                                         prompt_lookup_min=0)])
def test_bad_settings(kwargs):
    with pytest.raises(ValueError):
        NgramProposer(**kwargs)

"""Training iterator: deterministic, resumable to the exact batch, multi-process; validation."""

import numpy as np
import pytest

from data import PackedExamples, TrainBatches, validation_batches

EXAMPLES = PackedExamples(np.arange(1, 1 + 16 * 37) % 250, seq_len=16, end_of_document_id=255,
                          pad_id=254, isolate_documents=True)  # 37 examples


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _assert_same(batches, others):
    assert len(batches) == len(others)
    for batch, other in zip(batches, others):
        for key in batch:
            np.testing.assert_array_equal(batch[key], other[key])


@pytest.mark.parametrize("k", [0, 1, 4, 9, 13])  # 37 examples / 4 per batch: epoch ends in 9-10
def test_restored_state_continues_with_exactly_the_next_batches(k):
    uninterrupted = _take(TrainBatches(EXAMPLES, global_batch_size=4, seed=3), k + 6)
    interrupted = TrainBatches(EXAMPLES, global_batch_size=4, seed=3)
    _assert_same(_take(interrupted, k), uninterrupted[:k])
    state = interrupted.state()
    resumed = TrainBatches(EXAMPLES, global_batch_size=4, seed=3, state=state)
    _assert_same(_take(resumed, 6), uninterrupted[k:])


def test_epochs_are_shuffled_differently_and_seeds_matter():
    batches = _take(TrainBatches(EXAMPLES, global_batch_size=1, seed=0), 2 * len(EXAMPLES))
    first_epoch = [b["inputs"][0, 0] for b in batches[:len(EXAMPLES)]]
    second_epoch = [b["inputs"][0, 0] for b in batches[len(EXAMPLES):]]
    assert sorted(first_epoch) == sorted(second_epoch) == sorted(
        EXAMPLES[i]["inputs"][0] for i in range(len(EXAMPLES)))
    assert first_epoch != second_epoch
    other_seed = _take(TrainBatches(EXAMPLES, global_batch_size=1, seed=1), len(EXAMPLES))
    assert [b["inputs"][0, 0] for b in other_seed] != first_epoch


def test_two_processes_read_disjoint_halves_whose_union_is_the_one_host_batch():
    one_host = _take(TrainBatches(EXAMPLES, global_batch_size=4, seed=5), 12)
    halves = [_take(TrainBatches(EXAMPLES, global_batch_size=4, seed=5, process_index=p,
                                 process_count=2), 12) for p in range(2)]
    for step, batch in enumerate(one_host):
        assert halves[0][step]["inputs"].shape == (2, 16)
        for key in batch:
            np.testing.assert_array_equal(
                np.concatenate([halves[0][step][key], halves[1][step][key]]), batch[key])
    # Each process resumes on its own state.
    process = TrainBatches(EXAMPLES, 4, 5, process_index=1, process_count=2)
    _take(process, 7)
    resumed = TrainBatches(EXAMPLES, 4, 5, process_index=1, process_count=2, state=process.state())
    _assert_same(_take(resumed, 5), halves[1][7:])
    with pytest.raises(ValueError, match="batch_size=5 is not divisible by the 2 processes"):
        TrainBatches(EXAMPLES, 5, 0, process_index=0, process_count=2)


def test_validation_batches_cover_every_token_once_in_order():
    batches = list(validation_batches(EXAMPLES, batch_size=5))
    assert len(batches) == 8  # 37 examples
    mask = np.concatenate([b["loss_mask"] for b in batches])
    assert mask.sum() == EXAMPLES.tokens.size - 1
    targets = np.concatenate([b["targets"] for b in batches])[mask > 0]
    np.testing.assert_array_equal(targets, EXAMPLES.tokens[1:])

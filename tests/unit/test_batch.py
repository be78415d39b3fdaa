import pickle

import numpy as np
import pytest
import torch

from core.batch import Group, Prompt, Sample


def _prompt(uid="p:0"):
    return Prompt(uid=uid, problem="<image>How many?", answer="3", image=np.zeros((56, 56, 3), np.uint8))


@pytest.mark.parametrize("image", [np.zeros((56, 56, 3), np.float32), np.zeros((56, 56), np.uint8),
                                   np.zeros((56, 56, 4), np.uint8), [[0]]])
def test_prompt_rejects_images_that_are_not_hw3_uint8(image):
    with pytest.raises(ValueError, match="'bad:7'"):
        Prompt(uid="bad:7", problem="q", answer="a", image=image)


def test_group_orders_clean_then_adversarial_and_pickles():
    clean = [Sample("p:0", torch.tensor([1, 2]), "a", "stop", reward=r, index=i) for i, r in enumerate([1.0, 0.0])]
    adv = [Sample("p:0", torch.tensor([3]), "b", "length", adversarial=True, reward=0.1, index=0)]
    group = Group(_prompt(), clean=clean, adversarial=adv, adv_image=np.ones((56, 56, 3), np.uint8))
    assert [s.adversarial for s in group.samples] == [False, False, True]
    assert group.rewards.dtype == torch.float32
    assert group.rewards.tolist() == pytest.approx([1.0, 0.0, 0.1])
    back = pickle.loads(pickle.dumps(group))
    assert back.prompt.uid == "p:0" and torch.equal(back.samples[2].response_ids, torch.tensor([3]))
    assert np.array_equal(back.adv_image, group.adv_image)


def test_account_counts_lost_and_duplicated_samples():
    import numpy as np
    import torch

    from cluster.pipeline import _account
    from core.batch import Group, Prompt, Sample

    def sample(adv, i, uid="p"):
        return Sample(prompt_uid=uid, response_ids=torch.tensor([1]), text="", finish_reason="stop",
                      adversarial=adv, index=i)

    g = Group(prompt=Prompt(uid="p", problem="<image>Q", answer="1", image=np.zeros((56, 56, 3), np.uint8)))
    g.clean, g.adversarial = [sample(False, 0), sample(False, 1)], [sample(True, 0)]
    assert _account([g], 2, 1) == (0, 0)
    g.clean = [sample(False, 0), sample(False, 0)]  # sample 1 lost, sample 0 twice
    assert _account([g], 2, 1) == (1, 1)
    g.clean = [sample(False, 0), sample(False, 1), sample(False, 2)]  # one more than asked
    assert _account([g], 2, 1) == (0, 1)
    g.clean = [sample(False, 0), sample(False, 1, uid="other")]  # another prompt's sample
    assert _account([g], 2, 1) == (2, 0)


def test_novel_fraction_counts_adversarial_responses_unlike_every_clean_one():
    import numpy as np
    import torch

    from cluster.pipeline import _novel_fraction
    from core.batch import Group, Prompt, Sample

    def sample(ids, adv):
        return Sample(prompt_uid="p", response_ids=torch.tensor(ids), text="", finish_reason="stop", adversarial=adv)

    g = Group(prompt=Prompt(uid="p", problem="<image>Q", answer="1", image=np.zeros((56, 56, 3), np.uint8)))
    g.clean = [sample([1, 2], False), sample([3], False)]
    g.adversarial = [sample([1, 2], True), sample([1, 2, 9], True), sample([4], True), sample([3], True)]
    assert _novel_fraction([g]) == 0.5
    g.adversarial = []
    assert _novel_fraction([g]) is None

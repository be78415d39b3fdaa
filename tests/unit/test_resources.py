"""core.resources: what each role asks Ray for, from cluster.*; the config checks of those keys."""

import pytest

from cluster.placement import role_requests
from core.config import ConfigError, load_config
from core.resources import actor_options, bundle, describe, role_resources, unplaced_message


def test_custom_resources_and_accelerator_type_reach_every_form_of_the_request():
    cfg = load_config(None, ["cluster.rollout_resources={rollout_node: 1}", "cluster.rollout_accelerator_type=L4",
                             "cluster.rollout_gpus=1", "cluster.learner_resources={head: 0.01}",
                             "cluster.learner_accelerator_type=H100", "learner.num_workers=2"])
    c = cfg.cluster
    assert actor_options(c, "rollout") == {"num_cpus": 1.0, "num_gpus": 1.0, "resources": {"rollout_node": 1.0},
                                           "accelerator_type": "L4"}
    # Ray turns accelerator_type into this resource; a placement-group bundle must carry it itself
    assert role_resources(c, "rollout") == {"CPU": 1.0, "GPU": 1.0, "rollout_node": 1.0, "accelerator_type:L4": 0.001}
    assert bundle(c, "learner") == {"CPU": 1.0, "head": 0.01, "accelerator_type:H100": 0.001}  # no GPU=0 entry
    assert actor_options(c, "adversary") == {"num_cpus": 1.0, "num_gpus": 0.0}  # nothing custom: plain options
    assert role_requests(cfg)["learner"] == [role_resources(c, "learner")] * 2
    assert describe(role_resources(c, "rollout")) == "CPU=1, GPU=1, rollout_node=1, accelerator_type:L4=0.001"


def test_the_unplaced_message_names_the_resources_what_is_free_and_the_keys():
    c = load_config(None, ["cluster.adversary_resources={gone: 1}"]).cluster
    text = unplaced_message("adversary", 1, 1, c, "adversary", {"CPU": 3.0})
    assert "\n" not in text
    assert "each needs CPU=1, GPU=0, gone=1 on one node, the cluster has CPU=3, GPU=0, gone=0 free" in text
    assert "cluster.adversary_resources" in text and "cluster.placement_timeout_s" in text


@pytest.mark.parametrize("override, key", [
    ("cluster.rollout_resources={gone: -1}", "cluster.rollout_resources.gone: must be >= 0"),
    ("cluster.learner_resources={GPU: 1}", "cluster.learner_resources.GPU: set CPUs and GPUs with"),
    ("cluster.adversary_accelerator_type=accelerator_type:A100", "cluster.adversary_accelerator_type: must be"),
    ("cluster.placement_timeout_s=0", "cluster.placement_timeout_s: must be > 0"),
])
def test_bad_role_resources_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])

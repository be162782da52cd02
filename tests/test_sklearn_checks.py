"""scikit-learn's own estimator checks on every head kind (TunedHead is no estimator: pipeline.tune trains it).

Small parameters keep the run short; a check that cannot apply is an expected failure with its reason.
"""

from sklearn.utils.estimator_checks import parametrize_with_checks

from headstart.heads import AutoHead, KNNHead, LogisticHead, MLPHead, MLPRegressorHead, SoftmaxHead

HEADS = [SoftmaxHead(epochs=5), MLPHead(hidden=(16,), epochs=20, lr=0.01), LogisticHead(), KNNHead(n_neighbors=3),
         AutoHead(folds=3, l2_grid=(1.0, 1e-2), neighbors=(3,)),
         MLPRegressorHead(hidden=(16,), epochs=5, min_steps=200)]

CANNOT_APPLY = {
    "check_class_weight_classifiers": "class_weight takes None or 'balanced' only: a head file keeps its "
                                      "parameters as JSON, where a dict's class keys would turn into strings",
}


def expected_failures(estimator: object) -> dict[str, str]:
    return CANNOT_APPLY


@parametrize_with_checks(HEADS, expected_failed_checks=expected_failures)
def test_heads_pass_scikit_learns_estimator_checks(estimator, check):
    check(estimator)

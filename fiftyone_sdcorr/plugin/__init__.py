"""FiftyOne operators and panels: thin glue that reads params, calls the dataset-level
functions, reports progress. Every class here is declared in ``fiftyone.yml``."""


def register(p):
    from fiftyone_sdcorr.plugin.operators_features import OPERATORS as features_ops
    from fiftyone_sdcorr.plugin.operators_keypoints import OPERATORS as keypoint_ops
    from fiftyone_sdcorr.plugin.operators_masks import OPERATORS as mask_ops
    from fiftyone_sdcorr.plugin.operators_swap import OPERATORS as swap_ops
    from fiftyone_sdcorr.plugin.operators_views import OPERATORS as view_ops
    from fiftyone_sdcorr.plugin.panels import PANELS

    for cls in (*features_ops, *keypoint_ops, *mask_ops, *view_ops, *swap_ops, *PANELS):
        p.register(cls)

"""The names of the attributes this package writes on labels, in one place.

The dataset layer writes them (propagation, mask propagation, the review) and the plugin
reads them (the match panel pairs predictions with their reference and target objects,
and writes its verdicts), so both import them from here; never a literal elsewhere.
"""

#: the reference sample (or reference object) a predicted label was carried from
REFERENCE_ID = "sdcorr_reference_id"
#: per point: the reference each point came from (``combine="per_point"``; the review's evidence)
REFERENCE_IDS = "sdcorr_reference_ids"
#: the index of the reference keypoint instance a prediction was carried from
INSTANCE = "sdcorr_instance"
#: True when the mirrored reference matched better (flip alignment)
FLIPPED = "sdcorr_flipped"
#: per-object outputs: the id of the target detection the label belongs to
DETECTION_ID = "sdcorr_detection_id"
#: the mean cosine similarity of the match a label came from
SIMILARITY = "sdcorr_similarity"
#: the review (``flag_keypoint_annotations``), per point
SUSPICIOUS = "sdcorr_suspicious"
EVIDENCE = "sdcorr_evidence"
EVIDENCE_CONFIDENCE = "sdcorr_evidence_confidence"
DISTANCE = "sdcorr_distance"
#: the match panel's verdicts: of a whole prediction, and per point
VERDICT = "sdcorr_verdict"
POINT_VERDICTS = "sdcorr_point_verdicts"

__all__ = ["REFERENCE_ID", "REFERENCE_IDS", "INSTANCE", "FLIPPED", "DETECTION_ID", "SIMILARITY", "SUSPICIOUS",
           "EVIDENCE", "EVIDENCE_CONFIDENCE", "DISTANCE", "VERDICT", "POINT_VERDICTS"]

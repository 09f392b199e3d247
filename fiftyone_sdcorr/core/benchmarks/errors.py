"""The one error of benchmark and predictions files (readers, flow files, PCK)."""


class BenchmarkFormatError(ValueError):
    """A benchmark or predictions file is missing or not in the expected format; the
    message names the file, the pair (when known) and the field, with what it must be
    and what it holds. (:class:`~fiftyone_sdcorr.core.benchmarks.pck.PredictionsError` is
    one for predictions files.)"""

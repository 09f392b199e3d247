"""Benchmark files: SPair-71k / PF-Pascal / AP-10K / TSS readers, flow files, the PCK protocol. No FiftyOne import."""

"""Tools on top of the stages: the end-to-end comparison (``bench``, ``demo``), ``profile-io``,
GPU telemetry, and the system header and fio helper they share."""

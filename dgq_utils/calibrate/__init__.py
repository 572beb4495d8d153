"""Run prompts through a pipeline and turn what is seen into quantizer parameters: the trace harness
(:mod:`.trace`), activation/attention statistics as tidy tables (:mod:`.observe`) and calibration
(:mod:`.calibration`)."""

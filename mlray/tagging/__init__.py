"""``mlray tag``: the job (``job``), its exactly-once plan (``plan``) and
rescoring stored embeddings (``rescore``). Never imports ``mlray.training``;
importing it imports neither torch nor Ray."""

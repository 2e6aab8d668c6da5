"""The Agent shell and what turns plans into algorithms.

* :mod:`~flowrl.algorithms.agent`: ``Agent`` (config -> workers -> plan; train, save,
  restore, act, evaluate);
* :mod:`~flowrl.algorithms.config`: COMMON_CONFIG, merging and validation;
* :mod:`~flowrl.algorithms.checkpoint`, :mod:`~flowrl.algorithms.result_logger`: the
  checkpoint format and the trial files;
* :mod:`~flowrl.algorithms.registry`: algorithm names -> Agent classes;
* :mod:`~flowrl.algorithms.builder`: ``build_agent`` for plans written by users;
* :mod:`~flowrl.algorithms.trainable`: the Ray Tune Trainable of each Agent class.

The plan modules (:mod:`flowrl.plans`) subclass the Agent and sit one layer above.
"""

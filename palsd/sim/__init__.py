"""The simulated inference host: a calibrated GPU + vLLM twin in virtual time, and its shells.

`palsd.sim.engine.TwinHost` is the engine (no clock of its own: time moves only through
`step(dt_s)`); `palsd.sim.host_cli` is the real-time HTTP shell (`palsd sim-host`);
`palsd.sim.simulate` runs policies on the engine in virtual time.
"""

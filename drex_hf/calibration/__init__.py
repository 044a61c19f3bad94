"""`drex calibrate`: thresholds with a stated quality guarantee, and the scheduler's cost constants.

`thresholds` picks per-exit thresholds by Learn-then-Test on observed (confidence, agreement) pairs;
`costs` fits the scheduler's cost model from timings and decides which exit points pay on a device.
"""

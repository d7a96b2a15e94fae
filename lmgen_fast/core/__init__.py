"""The bottom layer: values and rules every other layer builds on, with no model, no
kernel and no device state (sampling parameters, the Philox noise, errors and status bits,
the per-row rules, small integer helpers, progress display)."""

"""Sound in: loading, slicing, per-frame envelopes and beats, features (numpy only)."""

"""Golden cases: reference outputs recorded from microsoft/TRELLIS.2, replayed through our implementation."""

"""Dataset builders and the emoji art they draw: the demo set (OpenMoji) and the cross-artist benchmark
(OpenMoji, Twemoji and Microsoft Fluent). The demo-data stage and the cross-artist command call them."""

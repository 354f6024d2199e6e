"""Tools that measure mechanisms, built on the library and on the executable privacy maps:
`audit` (black-box audit), `stats` (N_w and S_w), `calibrate` (ε for a target), `evaluate`
(downstream utility) and `risk` (attack success). The CLI's commands are thin layers over them."""

"""What `vub-client write OFF LEN SEED` writes: its xorshift64 fill (fill()
in tests/vhost/vub-client.c), computed here independently so a read is
compared with what was written, not with what came back.  No imports: the
soak (tests/soak/soak.py) uses it too."""


def vub_pattern(length, seed):
    mask = (1 << 64) - 1
    x = (seed * 0x9e3779b97f4a7c15 + 1) & mask
    out = bytearray(length)
    for i in range(length):
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
        out[i] = x & 0xff
    return bytes(out)

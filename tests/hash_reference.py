"""A pure-Python uint64 reference of fullrange.data.hashing (splitmix64), for the tests."""
M64 = (1 << 64) - 1


def mix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def word(seed: int, epoch: int, index: int, k: int) -> int:
    key = mix(mix(mix(seed & M64) ^ (epoch & M64)) ^ (index & M64))
    return mix(key ^ k)


def below(w: int, n: int) -> int:
    return ((w >> 32) * n) >> 32

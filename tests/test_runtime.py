"""The runtime's reading of the host, without starting Ray."""

from __future__ import annotations


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    from mlray.runtime import cpu_has_native_bf16

    def flags(*names):
        path = tmp_path / "_".join(names or ("none",))
        path.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 " + " ".join(names) + "\n")
        return str(path)

    assert cpu_has_native_bf16(flags("avx512f", "avx512_bf16")) is True  # AMD Zen 4, Intel Cooper Lake
    assert cpu_has_native_bf16(flags("amx_tile", "amx_bf16")) is True  # Intel Sapphire Rapids
    assert cpu_has_native_bf16(flags("avx512f")) is False  # AVX-512 alone does not compute in bf16
    assert cpu_has_native_bf16(flags()) is False
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is None  # no /proc/cpuinfo: cannot tell

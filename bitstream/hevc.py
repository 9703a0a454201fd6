"""A small pure-Python HEVC (H.265) header parser: slice type and slice QP per picture.

FFmpeg's HEVC decoder exports neither motion vectors nor a QP table, so the
reader parses the headers itself. This module handles NAL framing (Annex-B
start codes or the length-prefixed framing of MP4/MKV ``hvcC``), removes
emulation prevention bytes, and parses just enough of the VPS/SPS/PPS to walk
each slice segment header up to ``slice_qp_delta`` (ITU-T H.265 7.3.2-7.3.8):
SliceQpY = 26 + init_qp_minus26 + slice_qp_delta.

Scope: single-layer streams (nuh_layer_id 0); range extension syntax that
sits *after* slice_qp_delta is not needed. Screen-content coding extensions
are not parsed (their PPS/SPS flags are assumed off). The QP is the slice's
base QP: blocks may deviate from it by cu_qp_delta (adaptive quantisation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bitstream.nal import nal_units as iter_nal_units

__all__ = [
    "HevcParser",
    "PictureInfo",
    "PPS",
    "SPS",
    "SliceHeader",
    "iter_nal_units",
    "remove_emulation_prevention",
]

SLICE_TYPES = {0: "B", 1: "P", 2: "I"}
NAL_VPS, NAL_SPS, NAL_PPS = 32, 33, 34
NAL_IDR_W_RADL, NAL_IDR_N_LP = 19, 20
MAX_HEADER_BYTES = 4096  # slice headers are far shorter; bounds the big-int conversion


class BitReader:
    """MSB-first bit reader over an RBSP (emulation prevention already removed)."""

    __slots__ = ("_value", "_bits", "pos")

    def __init__(self, data: bytes) -> None:
        self._value = int.from_bytes(data, "big")
        self._bits = len(data) * 8
        self.pos = 0

    def u(self, n: int) -> int:
        if n == 0:
            return 0
        end = self.pos + n
        if end > self._bits:
            raise ValueError("header runs past the end of the NAL unit")
        self.pos = end
        return (self._value >> (self._bits - end)) & ((1 << n) - 1)

    def flag(self) -> bool:
        return bool(self.u(1))

    def skip(self, n: int) -> None:
        if self.pos + n > self._bits:
            raise ValueError("header runs past the end of the NAL unit")
        self.pos += n

    def ue(self) -> int:
        zeros = 0
        while not self.u(1):
            zeros += 1
            if zeros > 31:
                raise ValueError("invalid Exp-Golomb code")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)


def remove_emulation_prevention(data: bytes) -> bytes:
    """NAL payload -> RBSP: drop each 0x03 of a 0x000003 sequence."""
    return data.replace(b"\x00\x00\x03", b"\x00\x00") if b"\x00\x00\x03" in data else data


def _ceil_log2(n: int) -> int:
    return max(0, (n - 1).bit_length())


# ------------------------------------------------------------ parameter sets


@dataclass
class ShortTermRPS:
    """One st_ref_pic_set: POC deltas and whether the current picture uses them."""

    delta_s0: list[int] = field(default_factory=list)
    used_s0: list[bool] = field(default_factory=list)
    delta_s1: list[int] = field(default_factory=list)
    used_s1: list[bool] = field(default_factory=list)

    @property
    def num_delta_pocs(self) -> int:
        return len(self.delta_s0) + len(self.delta_s1)

    @property
    def num_used(self) -> int:
        return sum(self.used_s0) + sum(self.used_s1)


@dataclass
class SPS:
    sps_id: int
    chroma_format_idc: int
    separate_colour_plane: bool
    width: int
    height: int
    bit_depth: int
    log2_max_poc_lsb: int
    ctb_size: int
    st_rps: list[ShortTermRPS]
    long_term_refs_present: bool
    lt_used_by_curr: list[bool]
    temporal_mvp: bool
    sao: bool

    @property
    def chroma_array_type(self) -> int:
        return 0 if self.separate_colour_plane else self.chroma_format_idc

    @property
    def ctb_cols(self) -> int:
        return -(-self.width // self.ctb_size)

    @property
    def ctb_rows(self) -> int:
        return -(-self.height // self.ctb_size)


@dataclass
class PPS:
    pps_id: int
    sps_id: int
    dependent_slices: bool
    output_flag_present: bool
    num_extra_slice_header_bits: int
    cabac_init_present: bool
    num_ref_idx_default: tuple[int, int]  # active minus1, lists 0 and 1
    init_qp: int  # 26 + init_qp_minus26
    weighted_pred: bool
    weighted_bipred: bool
    tiles: bool
    lists_modification_present: bool


def _skip_profile_tier_level(r: BitReader, max_sub_layers_minus1: int) -> None:
    r.skip(88)  # general profile space .. general_inbld/reserved
    r.skip(8)  # general_level_idc
    present = [(r.flag(), r.flag()) for _ in range(max_sub_layers_minus1)]
    if max_sub_layers_minus1 > 0:
        r.skip(2 * (8 - max_sub_layers_minus1))
    for profile, level in present:
        if profile:
            r.skip(88)
        if level:
            r.skip(8)


def _skip_scaling_list_data(r: BitReader) -> None:
    for size_id in range(4):
        for _ in range(0, 6, 3 if size_id == 3 else 1):
            if not r.flag():  # scaling_list_pred_mode_flag
                r.ue()  # scaling_list_pred_matrix_id_delta
                continue
            coefs = min(64, 1 << (4 + (size_id << 1)))
            if size_id > 1:
                r.se()  # scaling_list_dc_coef_minus8
            for _ in range(coefs):
                r.se()


def _parse_st_rps(r: BitReader, idx: int, num_sets: int, sets: list[ShortTermRPS]) -> ShortTermRPS:
    """st_ref_pic_set(idx) with the inter-RPS derivation of H.265 7.4.8."""
    if idx != 0 and r.flag():  # inter_ref_pic_set_prediction_flag
        delta_idx = r.ue() + 1 if idx == num_sets else 1
        sign = r.u(1)
        delta_rps = (1 - 2 * sign) * (r.ue() + 1)
        ref = sets[idx - delta_idx]
        used, use_delta = [], []
        for _ in range(ref.num_delta_pocs + 1):
            u = r.flag()
            used.append(u)
            use_delta.append(True if u else r.flag())
        n0 = len(ref.delta_s0)
        rps = ShortTermRPS()
        # Negative pictures (7-61).
        for j in range(len(ref.delta_s1) - 1, -1, -1):
            d = ref.delta_s1[j] + delta_rps
            if d < 0 and use_delta[n0 + j]:
                rps.delta_s0.append(d)
                rps.used_s0.append(used[n0 + j])
        if delta_rps < 0 and use_delta[ref.num_delta_pocs]:
            rps.delta_s0.append(delta_rps)
            rps.used_s0.append(used[ref.num_delta_pocs])
        for j in range(n0):
            d = ref.delta_s0[j] + delta_rps
            if d < 0 and use_delta[j]:
                rps.delta_s0.append(d)
                rps.used_s0.append(used[j])
        # Positive pictures (7-62).
        for j in range(n0 - 1, -1, -1):
            d = ref.delta_s0[j] + delta_rps
            if d > 0 and use_delta[j]:
                rps.delta_s1.append(d)
                rps.used_s1.append(used[j])
        if delta_rps > 0 and use_delta[ref.num_delta_pocs]:
            rps.delta_s1.append(delta_rps)
            rps.used_s1.append(used[ref.num_delta_pocs])
        for j in range(len(ref.delta_s1)):
            d = ref.delta_s1[j] + delta_rps
            if d > 0 and use_delta[n0 + j]:
                rps.delta_s1.append(d)
                rps.used_s1.append(used[n0 + j])
        return rps
    rps = ShortTermRPS()
    num_neg, num_pos = r.ue(), r.ue()
    if num_neg > 16 or num_pos > 16:
        raise ValueError("invalid short-term reference picture set")
    poc = 0
    for _ in range(num_neg):
        poc -= r.ue() + 1
        rps.delta_s0.append(poc)
        rps.used_s0.append(r.flag())
    poc = 0
    for _ in range(num_pos):
        poc += r.ue() + 1
        rps.delta_s1.append(poc)
        rps.used_s1.append(r.flag())
    return rps


def parse_sps(rbsp: bytes) -> SPS:
    r = BitReader(rbsp[2:])
    r.skip(4)  # sps_video_parameter_set_id
    max_sub_layers_minus1 = r.u(3)
    r.skip(1)
    _skip_profile_tier_level(r, max_sub_layers_minus1)
    sps_id = r.ue()
    chroma = r.ue()
    separate = chroma == 3 and r.flag()
    width, height = r.ue(), r.ue()
    if r.flag():  # conformance window
        for _ in range(4):
            r.ue()
    bit_depth = r.ue() + 8
    r.ue()  # bit_depth_chroma_minus8
    log2_max_poc_lsb = r.ue() + 4
    sub_layer_info = r.flag()
    for _ in range(0 if sub_layer_info else max_sub_layers_minus1, max_sub_layers_minus1 + 1):
        r.ue(), r.ue(), r.ue()
    log2_min_cb = r.ue() + 3
    ctb_size = 1 << (log2_min_cb + r.ue())
    for _ in range(4):  # transform block sizes and hierarchy depths
        r.ue()
    if r.flag() and r.flag():  # scaling_list_enabled, sps_scaling_list_data_present
        _skip_scaling_list_data(r)
    r.skip(1)  # amp_enabled_flag
    sao = r.flag()
    if r.flag():  # pcm_enabled_flag
        r.skip(8)
        r.ue(), r.ue()
        r.skip(1)
    num_sets = r.ue()
    if num_sets > 64:
        raise ValueError("invalid num_short_term_ref_pic_sets")
    sets: list[ShortTermRPS] = []
    for i in range(num_sets):
        sets.append(_parse_st_rps(r, i, num_sets, sets))
    lt_present = r.flag()
    lt_used: list[bool] = []
    if lt_present:
        for _ in range(r.ue()):
            r.skip(log2_max_poc_lsb)
            lt_used.append(r.flag())
    temporal_mvp = r.flag()
    return SPS(
        sps_id,
        chroma,
        separate,
        width,
        height,
        bit_depth,
        log2_max_poc_lsb,
        ctb_size,
        sets,
        lt_present,
        lt_used,
        temporal_mvp,
        sao,
    )


def parse_pps(rbsp: bytes) -> PPS:
    r = BitReader(rbsp[2:])
    pps_id, sps_id = r.ue(), r.ue()
    dependent = r.flag()
    output_flag = r.flag()
    extra_bits = r.u(3)
    r.skip(1)  # sign_data_hiding_enabled_flag
    cabac_init = r.flag()
    ref_defaults = (r.ue(), r.ue())
    init_qp = 26 + r.se()
    r.skip(2)  # constrained_intra_pred, transform_skip_enabled
    if r.flag():  # cu_qp_delta_enabled_flag
        r.ue()
    r.se(), r.se()  # pps_cb/cr_qp_offset
    r.skip(1)  # pps_slice_chroma_qp_offsets_present_flag
    weighted_pred, weighted_bipred = r.flag(), r.flag()
    r.skip(1)  # transquant_bypass_enabled_flag
    tiles = r.flag()
    r.skip(1)  # entropy_coding_sync_enabled_flag
    if tiles:
        cols, rows = r.ue(), r.ue()
        if not r.flag():  # uniform_spacing_flag
            for _ in range(cols + rows):
                r.ue()
        r.skip(1)
    r.skip(1)  # pps_loop_filter_across_slices_enabled_flag
    if r.flag():  # deblocking_filter_control_present_flag
        r.skip(1)  # override enabled
        if not r.flag():  # pps_deblocking_filter_disabled_flag
            r.se(), r.se()
    if r.flag():
        _skip_scaling_list_data(r)
    lists_mod = r.flag()
    return PPS(
        pps_id,
        sps_id,
        dependent,
        output_flag,
        extra_bits,
        cabac_init,
        ref_defaults,
        init_qp,
        weighted_pred,
        weighted_bipred,
        tiles,
        lists_mod,
    )


# ----------------------------------------------------------------- slices


@dataclass
class SliceHeader:
    nal_type: int
    first_in_pic: bool
    dependent: bool
    address: int  # first CTB (raster scan) of the segment
    slice_type: str  # "I", "P", "B"
    qp: int  # SliceQpY
    poc_lsb: int
    pic_output: bool


def _skip_pred_weight_table(r: BitReader, sps: SPS, slice_type: int, nref: tuple[int, int]) -> None:
    r.ue()  # luma_log2_weight_denom
    chroma = sps.chroma_array_type != 0
    if chroma:
        r.se()
    for lst in range(2 if slice_type == 0 else 1):
        n = nref[lst] + 1
        luma = [r.flag() for _ in range(n)]
        chroma_flags = [r.flag() for _ in range(n)] if chroma else [False] * n
        for i in range(n):
            if luma[i]:
                r.se(), r.se()
            if chroma_flags[i]:
                for _ in range(4):
                    r.se()


def parse_slice_header(
    rbsp: bytes,
    nal_type: int,
    sps_by_id: dict[int, SPS],
    pps_by_id: dict[int, PPS],
    previous: SliceHeader | None,
) -> SliceHeader:
    """Parse a slice segment header up to slice_qp_delta (H.265 7.3.6.1)."""
    r = BitReader(rbsp[2:MAX_HEADER_BYTES])
    first = r.flag()
    if 16 <= nal_type <= 23:
        r.skip(1)  # no_output_of_prior_pics_flag
    pps_id = r.ue()
    pps = pps_by_id.get(pps_id)
    if pps is None:
        raise ValueError(f"slice refers to missing PPS {pps_id}")
    sps = sps_by_id.get(pps.sps_id)
    if sps is None:
        raise ValueError(f"PPS {pps_id} refers to missing SPS {pps.sps_id}")
    dependent, address = False, 0
    if not first:
        if pps.dependent_slices:
            dependent = r.flag()
        address = r.u(_ceil_log2(sps.ctb_cols * sps.ctb_rows))
    if dependent:
        if previous is None:
            raise ValueError("dependent slice segment without a preceding slice")
        return SliceHeader(
            nal_type,
            first,
            True,
            address,
            previous.slice_type,
            previous.qp,
            previous.poc_lsb,
            previous.pic_output,
        )
    r.skip(pps.num_extra_slice_header_bits)
    slice_type = r.ue()
    if slice_type not in SLICE_TYPES:
        raise ValueError(f"invalid slice_type {slice_type}")
    pic_output = r.flag() if pps.output_flag_present else True
    if sps.separate_colour_plane:
        r.skip(2)
    poc_lsb, temporal_mvp, num_pic_total_curr = 0, False, 0
    if nal_type not in (NAL_IDR_W_RADL, NAL_IDR_N_LP):
        poc_lsb = r.u(sps.log2_max_poc_lsb)
        if not r.flag():  # short_term_ref_pic_set_sps_flag
            n = len(sps.st_rps)
            rps = _parse_st_rps(r, n, n, sps.st_rps)
        else:
            idx = r.u(_ceil_log2(len(sps.st_rps))) if len(sps.st_rps) > 1 else 0
            if idx >= len(sps.st_rps):
                raise ValueError("short_term_ref_pic_set_idx out of range")
            rps = sps.st_rps[idx]
        num_pic_total_curr = rps.num_used
        if sps.long_term_refs_present:
            num_lt_sps = r.ue() if sps.lt_used_by_curr else 0
            num_lt = num_lt_sps + r.ue()
            for i in range(num_lt):
                if i < num_lt_sps:
                    k = len(sps.lt_used_by_curr)
                    idx = r.u(_ceil_log2(k)) if k > 1 else 0
                    used = sps.lt_used_by_curr[min(idx, k - 1)]
                else:
                    r.skip(sps.log2_max_poc_lsb)
                    used = r.flag()
                num_pic_total_curr += used
                if r.flag():  # delta_poc_msb_present_flag
                    r.ue()
        if sps.temporal_mvp:
            temporal_mvp = r.flag()
    if sps.sao:
        r.skip(1)
        if sps.chroma_array_type != 0:
            r.skip(1)
    if slice_type != 2:
        nref = list(pps.num_ref_idx_default)
        if r.flag():  # num_ref_idx_active_override_flag
            nref[0] = r.ue()
            if slice_type == 0:
                nref[1] = r.ue()
        if pps.lists_modification_present and num_pic_total_curr > 1:
            bits = _ceil_log2(num_pic_total_curr)
            for lst in range(2 if slice_type == 0 else 1):
                if r.flag():
                    r.skip(bits * (nref[lst] + 1))
        if slice_type == 0:
            r.skip(1)  # mvd_l1_zero_flag
        if pps.cabac_init_present:
            r.skip(1)
        if temporal_mvp:
            from_l0 = r.flag() if slice_type == 0 else True
            if (from_l0 and nref[0] > 0) or (not from_l0 and nref[1] > 0):
                r.ue()  # collocated_ref_idx
        if (pps.weighted_pred and slice_type == 1) or (pps.weighted_bipred and slice_type == 0):
            _skip_pred_weight_table(r, sps, slice_type, (nref[0], nref[1]))
        r.ue()  # five_minus_max_num_merge_cand
    qp = pps.init_qp + r.se()
    if not -6 * (sps.bit_depth - 8) <= qp <= 51:
        raise ValueError(f"slice QP {qp} out of range")
    return SliceHeader(
        nal_type, first, False, address, SLICE_TYPES[slice_type], qp, poc_lsb, pic_output
    )


# ---------------------------------------------------------------- pictures


@dataclass
class PictureInfo:
    """The slice segments of one coded picture."""

    slices: list[SliceHeader]
    sps: SPS
    tiles: bool = False

    @property
    def pict_type(self) -> str:
        types = {s.slice_type for s in self.slices}
        return "B" if "B" in types else "P" if "P" in types else "I"

    @property
    def slice_types(self) -> list[str]:
        return [s.slice_type for s in self.slices]

    def _ctb_counts(self) -> list[int]:
        total = self.sps.ctb_cols * self.sps.ctb_rows
        starts = [s.address for s in self.slices] + [total]
        return [max(0, b - a) for a, b in zip(starts[:-1], starts[1:], strict=True)]

    @property
    def qp(self) -> float | None:
        """Picture QP: the slice QPs averaged over the CTBs each slice covers."""
        if not self.slices:
            return None
        counts = self._ctb_counts()
        if self.tiles or sum(counts) == 0:
            return float(np.mean([s.qp for s in self.slices]))
        return float(np.average([s.qp for s in self.slices], weights=counts))

    def qp_map(self, height: int, width: int) -> np.ndarray | None:
        """Slice QP painted on the 16x16 grid (CTBs in raster order; constant with tiles)."""
        if not self.slices:
            return None
        gh, gw = -(-height // 16), -(-width // 16)
        qps = [s.qp for s in self.slices]
        if len(set(qps)) == 1 or self.tiles:
            return np.full((gh, gw), self.qp, np.float32)
        sps = self.sps
        ctb_qp = np.repeat(np.asarray(qps, np.float32), self._ctb_counts())
        ctb_qp = ctb_qp.reshape(sps.ctb_rows, sps.ctb_cols)
        k = sps.ctb_size // 16
        cells = np.repeat(np.repeat(ctb_qp, k, axis=0), k, axis=1)
        return np.ascontiguousarray(cells[:gh, :gw])


class HevcParser:
    """Stateful parser: feed it packets in decode order, get a PictureInfo per picture."""

    def __init__(self) -> None:
        self.sps: dict[int, SPS] = {}
        self.pps: dict[int, PPS] = {}
        self.length_size: int | None = None  # None: Annex-B
        self._last: SliceHeader | None = None

    def set_extradata(self, extradata: bytes) -> None:
        """Read parameter sets from codec extradata (``hvcC`` or Annex-B)."""
        if len(extradata) > 22 and extradata[0] == 1 and not extradata.startswith(b"\x00\x00"):
            self.length_size = (extradata[21] & 3) + 1
            pos, count = 23, extradata[22]
            for _ in range(count):
                if pos + 3 > len(extradata):
                    raise ValueError("truncated hvcC")
                n = int.from_bytes(extradata[pos + 1 : pos + 3], "big")
                pos += 3
                for _ in range(n):
                    size = int.from_bytes(extradata[pos : pos + 2], "big")
                    self._parameter_set(extradata[pos + 2 : pos + 2 + size])
                    pos += 2 + size
        else:
            for nal in iter_nal_units(extradata):
                self._parameter_set(nal)

    def _parameter_set(self, nal: bytes) -> None:
        if len(nal) < 3:
            return
        nal_type, layer = (nal[0] >> 1) & 0x3F, ((nal[0] & 1) << 5) | (nal[1] >> 3)
        if layer != 0:
            return
        if nal_type == NAL_SPS:
            sps = parse_sps(remove_emulation_prevention(nal))
            self.sps[sps.sps_id] = sps
        elif nal_type == NAL_PPS:
            pps = parse_pps(remove_emulation_prevention(nal))
            self.pps[pps.pps_id] = pps

    def parse_packet(self, data: bytes) -> PictureInfo | None:
        """Parse one packet (an access unit); return its picture, or None if it has none."""
        slices: list[SliceHeader] = []
        sps: SPS | None = None
        tiles = False
        for nal in iter_nal_units(data, self.length_size):
            if len(nal) < 3:
                continue
            nal_type = (nal[0] >> 1) & 0x3F
            layer = ((nal[0] & 1) << 5) | (nal[1] >> 3)
            if layer != 0:
                continue
            if nal_type in (NAL_SPS, NAL_PPS):
                self._parameter_set(nal)
            elif nal_type < 32 and (nal_type <= 9 or 16 <= nal_type <= 21):
                rbsp = remove_emulation_prevention(nal[:MAX_HEADER_BYTES])
                sh = parse_slice_header(rbsp, nal_type, self.sps, self.pps, self._last)
                self._last = sh
                if sh.first_in_pic and slices:
                    break  # a second picture in one packet: keep the first
                if not sh.dependent:
                    slices.append(sh)
                if sps is None:
                    pps = self.pps[self._pps_id(rbsp, nal_type)]
                    sps, tiles = self.sps[pps.sps_id], pps.tiles
        if not slices or sps is None:
            return None
        return PictureInfo(slices=slices, sps=sps, tiles=tiles)

    @staticmethod
    def _pps_id(rbsp: bytes, nal_type: int) -> int:
        r = BitReader(rbsp[2:16])
        r.skip(1)
        if 16 <= nal_type <= 23:
            r.skip(1)
        return r.ue()

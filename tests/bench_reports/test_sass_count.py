"""bench.sass_count's walk of one compress chunk, on a hand-made SASS listing (no nvcc needed).

The listing has the shape of the kernels' chunks: a first chunk (with the MUFU.RCP that marks the
chunk code) ending in a code store, then the chunk that is walked, with the branches the walk
must decide: to the non-finite block (it stores the flag), to the chunk's end (all-zero group),
over a slow-path CALL (taken), and an unconditional jump.
"""
from bench import sass_count

LISTING = """
        Function : _ZN9splitlora15compress_kernelINS0_4BF16ELi4ELb0ELb1EEEvPKNT_7storage
        /*0000*/                   MUFU.RCP R1, R2 ;
        /*0010*/                   STG.E desc[UR8][R4.64], R7 ;
        /*0020*/                   BSSY B2, 0x0140 ;
        /*0030*/                   ISETP.GT.U32.AND P0, PT, R47, 0x7f7fffff, PT ;
        /*0040*/               @P0 BRA 0x0100 ;
        /*0050*/                   FSETP.NEU.AND P0, PT, R49, RZ, PT ;
        /*0060*/              @!P0 BRA 0x0130 ;
        /*0070*/                   FFMA R36, R0, R7, 12582920 ;
        /*0080*/              @!P1 BRA 0x00b0 ;
        /*0090*/                   MOV R2, 0x00a0 ;
        /*00a0*/                   CALL.REL.NOINC 0x1000 ;
        /*00b0*/                   PRMT R47, R36, 0x5410, R3 ;
        /*00c0*/                   BRA 0x0130 ;
        /*00d0*/                   NOP ;
        /*0100*/                   IMAD.MOV.U32 R7, RZ, RZ, RZ ;
        /*0110*/                   STG.E.STRONG.SYS desc[UR8][R2.64], R4 ;
        /*0120*/                   NOP ;
        /*0130*/                   BSYNC B2 ;
        /*0140*/                   STG.E desc[UR8][R4.64+0x80], R47 ;
"""


def test_walk_follows_the_common_path():
    (dtype, bits, lean, block), = list(sass_count.functions(LISTING))
    assert (dtype, bits, lean) == ("BF16", 4, True)
    # 0020 BSSY, 0030, 0040 (not taken), 0050, 0060 (not taken), 0070, 0080 (taken over the
    # CALL), 00b0, 00c0 (jump), 0130 BSYNC: 10 instructions before the code store at 0140.
    assert sass_count.walk_chunk(block) == 10

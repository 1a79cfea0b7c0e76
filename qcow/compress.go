package qcow

import (
	"bytes"
	"compress/flate"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/klauspost/compress/zstd"
)

// compressedDesc is the decoded descriptor of a compressed cluster
// (formats.md A.6): the compressed bytes lie at [off, off+size) in the
// host file.
type compressedDesc struct {
	off  uint64
	size uint64
}

// decodeCompressed splits the descriptor bits of a compressed L2 entry.
//
//	x = 62 - (cluster_bits - 8); bits 0..x-1: host byte offset;
//	bits x..61: number of additional 512-byte sectors.
func decodeCompressed(entry uint64, clusterBits uint32) compressedDesc {
	shift := 62 - (clusterBits - 8)
	off := entry & (1<<shift - 1)
	nsect := (entry>>shift)&(1<<(clusterBits-8)-1) + 1
	// "Compressed size ... nb_csectors * 512 - (offset & 511)"
	return compressedDesc{off: off, size: nsect*512 - off&511}
}

// decompressor inflates compressed clusters with the image's compression
// type. It is safe for concurrent use.
type decompressor struct {
	zstd       bool
	flatePool  sync.Pool // of io.ReadCloser implementing flate.Resetter
	zstdOnce   sync.Once
	zstdDec    *zstd.Decoder
	zstdDecErr error
}

// decompress inflates src into dst, which must be filled exactly: qemu
// requires a compressed cluster to decode to exactly cluster_size bytes
// and ignores the slop after the end of the stream in the last sector.
func (d *decompressor) decompress(dst, src []byte) error {
	if d.zstd {
		return d.unzstd(dst, src)
	}
	return d.inflate(dst, src)
}

// inflate decodes raw deflate (no zlib header; qemu uses windowBits -12).
func (d *decompressor) inflate(dst, src []byte) error {
	r, _ := d.flatePool.Get().(io.ReadCloser)
	if r == nil {
		r = flate.NewReader(bytes.NewReader(src))
	} else if err := r.(flate.Resetter).Reset(bytes.NewReader(src), nil); err != nil {
		return err
	}
	defer d.flatePool.Put(r)
	if _, err := io.ReadFull(r, dst); err != nil {
		return fmt.Errorf("inflate: %w", err)
	}
	return nil
}

// unzstd decodes one zstd frame: qemu stores a single frame with no
// length prefix, followed by slop up to the sector end, which a whole-input
// decoder would reject. The frame is measured first and decoded alone.
func (d *decompressor) unzstd(dst, src []byte) error {
	d.zstdOnce.Do(func() {
		d.zstdDec, d.zstdDecErr = zstd.NewReader(nil,
			zstd.WithDecoderConcurrency(1),
			zstd.WithDecoderLowmem(true),
			zstd.WithDecoderMaxWindow(8<<20),
			zstd.WithDecoderMaxMemory(64<<20))
	})
	if d.zstdDecErr != nil {
		return d.zstdDecErr
	}
	n, err := zstdFrameLen(src)
	if err != nil {
		return err
	}
	out, err := d.zstdDec.DecodeAll(src[:n], dst[:0])
	if err != nil {
		return fmt.Errorf("zstd: %w", err)
	}
	if len(out) != len(dst) || &out[0] != &dst[0] {
		if len(out) != len(dst) {
			return fmt.Errorf("zstd: cluster decodes to %d bytes, want %d", len(out), len(dst))
		}
		copy(dst, out)
	}
	return nil
}

var errZstdFrame = errors.New("zstd: malformed frame")

// zstdFrameLen returns the length of the zstd frame at the start of b
// (RFC 8878 section 3.1.1), walking its block headers.
func zstdFrameLen(b []byte) (int, error) {
	const magic = 0xfd2fb528
	if len(b) < 5 || binary.LittleEndian.Uint32(b) != magic {
		return 0, errZstdFrame
	}
	fhd := b[4]
	single := fhd&0x20 != 0
	pos := 5
	if !single {
		pos++ // Window_Descriptor
	}
	pos += [4]int{0, 1, 2, 4}[fhd&3] // Dictionary_ID
	switch fhd >> 6 {                // Frame_Content_Size
	case 0:
		if single {
			pos++
		}
	case 1:
		pos += 2
	case 2:
		pos += 4
	case 3:
		pos += 8
	}
	for {
		if pos+3 > len(b) {
			return 0, errZstdFrame
		}
		bh := uint32(b[pos]) | uint32(b[pos+1])<<8 | uint32(b[pos+2])<<16
		pos += 3
		size := int(bh >> 3)
		switch (bh >> 1) & 3 {
		case 0, 2: // raw, compressed
		case 1: // RLE: one byte
			size = 1
		default:
			return 0, errZstdFrame
		}
		if size > len(b)-pos {
			return 0, errZstdFrame
		}
		pos += size
		if bh&1 != 0 {
			break
		}
	}
	if fhd&0x04 != 0 { // Content_Checksum
		pos += 4
	}
	if pos > len(b) {
		return 0, errZstdFrame
	}
	return pos, nil
}

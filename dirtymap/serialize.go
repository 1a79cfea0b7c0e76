package dirtymap

import "encoding/binary"

// The serialized form is qemu's (docs/interop/qcow2.txt, "Bitmaps", and
// formats.md B.4): granule b is bit b%8 of byte b/8, least significant bit
// first, and the bitmap is ceil(Bits/8) bytes long. Bits past Bits() in the
// last byte are zero. Because words[] keeps granule b at bit b%64 of word
// b/64, a word encoded little-endian is exactly the on-disk bytes 8*(b/64)
// onwards, so whole words are copied where the byte offset is aligned.

// SerializedSize returns the length in bytes of the serialized bitmap,
// ceil(Bits/8).
func (m *Map) SerializedSize() uint64 { return (m.nbits + 7) / 8 }

// serialClip clips the serialized byte range [off, off+n) to
// SerializedSize and returns the length left (0 when nothing is left).
func (m *Map) serialClip(off, n uint64) uint64 {
	ser := m.SerializedSize()
	if off >= ser {
		return 0
	}
	return min(n, ser-off)
}

// MarshalRange fills buf with the serialized bitmap bytes
// [byteOff, byteOff+len(buf)). Bytes past SerializedSize are set to 0.
func (m *Map) MarshalRange(byteOff uint64, buf []byte) {
	k := m.serialClip(byteOff, uint64(len(buf)))
	clear(buf[k:])
	if k == 0 {
		return
	}
	buf = buf[:k]
	m.mu.RLock()
	defer m.mu.RUnlock()
	p := byteOff
	for len(buf) > 0 {
		x := m.words[p>>3]
		if p&7 == 0 && len(buf) >= 8 {
			binary.LittleEndian.PutUint64(buf, x)
			buf = buf[8:]
			p += 8
			continue
		}
		// Unaligned start, or the last partial word.
		n := min(8-int(p&7), len(buf))
		for i := range n {
			buf[i] = byte(x >> ((int(p&7) + i) * 8))
		}
		buf = buf[n:]
		p += uint64(n)
	}
}

// UnmarshalRange ORs into m the bits of buf, taken as the serialized bitmap
// bytes [byteOff, byteOff+len(buf)). Bits at or past Bits() are ignored; so
// are bytes past SerializedSize. It never clears a granule.
func (m *Map) UnmarshalRange(byteOff uint64, buf []byte) {
	k := m.serialClip(byteOff, uint64(len(buf)))
	if k == 0 {
		return
	}
	buf = buf[:k]
	last := uint64(len(m.words)) - 1
	m.mu.Lock()
	defer m.mu.Unlock()
	p := byteOff
	for len(buf) > 0 {
		var x uint64
		n := 8
		if p&7 == 0 && len(buf) >= 8 {
			x = binary.LittleEndian.Uint64(buf)
		} else {
			n = min(8-int(p&7), len(buf))
			for i := range n {
				x |= uint64(buf[i]) << ((int(p&7) + i) * 8)
			}
		}
		if x != 0 {
			w := p >> 3
			if w == last {
				x &= m.tail
			}
			m.orWordLocked(w, x)
		}
		buf = buf[n:]
		p += uint64(n)
	}
}

// SetSerializedRange marks dirty every granule whose bit lies in the
// serialized bytes [byteOff, byteOff+n), clipped to Bits(). This is how a
// qcow2 bitmap table entry with offset 0 and bit 0 set ("all ones",
// formats.md B.3) is loaded.
func (m *Map) SetSerializedRange(byteOff, n uint64) {
	k := m.serialClip(byteOff, n)
	if k == 0 {
		return
	}
	// byteOff+k <= SerializedSize <= MaxBitmapBytes: no overflow.
	lo, hi := byteOff*8, min((byteOff+k)*8, m.nbits)
	m.mu.Lock()
	m.setLocked(lo, hi)
	m.mu.Unlock()
}

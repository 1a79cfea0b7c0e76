package integration

import (
	"encoding/binary"
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/cbtfs/cbtfs/internal/testutil"
)

// This file builds the image matrix of issue 2: every kind of qcow2 image
// and chain qemu makes, made with qemu-img and qemu-io in a test's
// temporary directory. Offsets and lengths given to qemu-io are often
// deliberately unaligned.

// builder makes images in dir.
type builder struct {
	t   *testing.T
	dir string
}

// path returns the absolute path of name in the builder's directory.
func (b *builder) path(name string) string { return filepath.Join(b.dir, name) }

// mkdirFor creates the directory that will hold p.
func (b *builder) mkdirFor(p string) {
	b.t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		b.t.Fatal(err)
	}
}

// qcow2 creates the qcow2 image name (qemu-img create options opts) and
// returns its path.
func (b *builder) qcow2(name, size string, opts ...string) string {
	b.t.Helper()
	p := b.path(name)
	b.mkdirFor(p)
	testutil.Create(b.t, p, size, opts...)
	return p
}

// overlay creates the qcow2 image name over the backing file base, stored
// in the image as given (a relative name is resolved by qemu, and must be
// by cbtfs, against name's directory), of format baseFmt.
func (b *builder) overlay(name, base, baseFmt, size string, opts ...string) string {
	b.t.Helper()
	return b.qcow2(name, size, append([]string{"-b", base, "-F", baseFmt}, opts...)...)
}

// io runs qemu-io commands on img.
func (b *builder) io(img string, cmds ...string) {
	b.t.Helper()
	testutil.IO(b.t, img, cmds...)
}

// raw writes the raw file name of size bytes, its content given by fill,
// and returns its path.
func (b *builder) raw(name string, size int64, fill func(off int64, p []byte)) string {
	b.t.Helper()
	p := b.path(name)
	b.mkdirFor(p)
	data := make([]byte, size)
	fill(0, data)
	if err := os.WriteFile(p, data, 0o644); err != nil {
		b.t.Fatal(err)
	}
	return p
}

// convert converts src to the qcow2 image name with extra qemu-img
// convert arguments (e.g. "-c", "-o", "cluster_size=4096") and returns its
// path.
func (b *builder) convert(src, name string, args ...string) string {
	b.t.Helper()
	p := b.path(name)
	b.mkdirFor(p)
	testutil.Convert(b.t, src, p, append([]string{"-O", "qcow2"}, args...)...)
	return p
}

// snapshot creates the internal snapshot name in img.
func (b *builder) snapshot(img, name string) {
	b.t.Helper()
	testutil.Img(b.t, "snapshot", "-c", name, img)
}

// requireCompressed fails the test unless img holds compressed clusters,
// so that a case meant to cover them cannot silently lose them.
func (b *builder) requireCompressed(img string) {
	b.t.Helper()
	if r, _ := testutil.Check(b.t, img); r.CompressedCluster == 0 {
		b.t.Fatalf("%s: no compressed clusters (qemu-img check: %+v)", img, r)
	}
}

// requireZeroAlloc fails the test unless img has a ZERO_ALLOC cluster
// (reads as zeros, host cluster kept): in qemu-img map, a local extent
// with zero set, data clear and a host offset.
func (b *builder) requireZeroAlloc(img string) {
	b.t.Helper()
	var m []struct {
		Depth  int    `json:"depth"`
		Zero   bool   `json:"zero"`
		Data   bool   `json:"data"`
		Offset *int64 `json:"offset"`
	}
	out := testutil.Img(b.t, "map", "--output=json", img)
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		b.t.Fatalf("qemu-img map: %v", err)
	}
	for _, e := range m {
		if e.Depth == 0 && e.Zero && !e.Data && e.Offset != nil {
			return
		}
	}
	b.t.Fatalf("%s: no ZERO_ALLOC cluster in qemu-img map:\n%s", img, out)
}

// pattern fills p (at file offset off) with a byte sequence that depends
// on the offset and seed, so that misplaced data never compares equal.
func pattern(seed byte) func(off int64, p []byte) {
	return func(off int64, p []byte) {
		for i := range p {
			o := off + int64(i)
			p[i] = byte(o>>9) ^ byte(o)*7 ^ seed
			if p[i] == 0 {
				p[i] = seed | 1
			}
		}
	}
}

// mixed fills p with chunks of chunk bytes that cycle through: a byte
// pattern (compresses well), random bytes (does not compress: qemu stores
// such clusters uncompressed), zeros, half random and half zeros (a
// compressed cluster spanning several sectors), and text.
func mixed(chunk int64, seed uint64) func(off int64, p []byte) {
	return func(off int64, p []byte) {
		rng := rand.New(rand.NewPCG(seed, uint64(off)))
		pat := pattern(byte(seed))
		for start := int64(0); start < int64(len(p)); start += chunk {
			c := p[start:min(start+chunk, int64(len(p)))]
			switch (off + start) / chunk % 5 {
			case 0:
				pat(off+start, c)
			case 1:
				for i := range c {
					c[i] = byte(rng.Uint32())
				}
			case 2:
				clear(c)
			case 3:
				for i := range c[:len(c)/2] {
					c[i] = byte(rng.Uint32())
				}
				clear(c[len(c)/2:])
			case 4:
				s := []byte("cbtfs " + strconv.FormatInt(off+start, 10) + " ")
				for i := range c {
					c[i] = s[i%len(s)]
				}
			}
		}
	}
}

// l1PastEOF reports whether the L1 table's cluster of the qcow2 image at
// path extends past the end of the host file (a fresh image ends inside
// its L1 cluster).
func l1PastEOF(t *testing.T, path string, clusterSize int64) bool {
	t.Helper()
	h := testutil.ReadAtFile(t, path, 0, 48)
	l1Off := int64(binary.BigEndian.Uint64(h[40:48]))
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return l1Off+clusterSize > fi.Size()
}

// imageCase is one image (or chain) of the matrix.
type imageCase struct {
	name string
	// build makes the chain in b.dir and returns the top image as cbtfs
	// and qemu-img are to be given it, and the working directory to run
	// them in ("" for the test's own). A relative image is relative to
	// that directory.
	build func(b *builder) (img, cwd string)
}

// top wraps a build function that only returns an absolute image path.
func top(f func(b *builder) string) func(b *builder) (string, string) {
	return func(b *builder) (string, string) { return f(b), "" }
}

// zeroOps are qemu-io commands that leave every kind of zero cluster on a
// v3 image of at least 6 MiB and clusters of at most 2 MiB: ZERO_PLAIN (write -z -u, discard, write -z
// on unallocated), ZERO_ALLOC (write -z on allocated), and a partial zero
// write inside data.
var zeroOps = []string{
	"write -P 0x21 0 2M",
	"write -z -u 128k 128k",
	"discard 512k 64k",
	"write -z 3M 64k",
	"write -z 1M 192k",
	"write -z -u 300000 10000",
	"write -z 1900000 1000",
	"write -P 0x22 4M 2M",
	"write -z 4M 2M",
}

// unalignedOps write patterns at unaligned offsets and lengths within the
// first 4 MiB.
var unalignedOps = []string{
	"write -P 0x5a 100001 7777",
	"write -P 0x5b 4095 2",
	"write -P 0x5c 8191 4097",
	"write -P 0x5d 1000003 65537",
	"write -P 0x5e 3 1",
	"write -P 0x5f 2097151 3",
	"write -P 0x60 3145000 70000",
}

// imageCases is the matrix.
func imageCases() []imageCase {
	var cs []imageCase
	add := func(name string, f func(b *builder) string) {
		cs = append(cs, imageCase{name: name, build: top(f)})
	}

	// qcow2 v2 (compat=0.10) and v3, every cluster size.
	add("v2-c64k", func(b *builder) string {
		img := b.qcow2("v2.qcow2", "8M", "-o", "compat=0.10")
		b.io(img, "write -P 0x11 0 64k", "write -P 0x12 1M 300k", "discard 1M 64k", "write -z 2M 64k", "write -P 0x13 8388096 512")
		b.io(img, unalignedOps...)
		return img
	})
	add("v2-c512", func(b *builder) string {
		img := b.qcow2("v2.qcow2", "4M", "-o", "compat=0.10,cluster_size=512")
		b.io(img, "write -P 0x14 0 512", "write -P 0x15 511 2", "write -P 0x16 3M 65536", "discard 3M 1024")
		b.io(img, unalignedOps...)
		return img
	})
	add("v2-c2M", func(b *builder) string {
		img := b.qcow2("v2.qcow2", "10M", "-o", "compat=0.10,cluster_size=2M")
		b.io(img, "write -P 0x17 0 2M", "write -P 0x18 3000000 100000", "write -P 0x19 8M 1M", "write -P 0x1a 10485759 1")
		return img
	})
	for _, cl := range []string{"512", "4k", "64k", "2M"} {
		add("v3-c"+cl, func(b *builder) string {
			img := b.qcow2("v3.qcow2", "16M", "-o", "cluster_size="+cl)
			b.io(img, zeroOps...)
			b.io(img, unalignedOps...)
			b.io(img, "write -P 0x1b 15M 1M", "write -P 0x1c 16777215 1")
			b.requireZeroAlloc(img)
			return img
		})
	}

	// Every refcount width; with 512-byte clusters and wide refcounts one
	// refblock covers few clusters, so the refcount table grows.
	for _, bits := range []int{1, 2, 4, 8, 16, 32, 64} {
		cl := "4k"
		if bits >= 32 {
			cl = "512"
		}
		add("refcount-"+strconv.Itoa(bits), func(b *builder) string {
			img := b.qcow2("rc.qcow2", "4M", "-o", "refcount_bits="+strconv.Itoa(bits)+",cluster_size="+cl)
			b.io(img, "write -P 0x22 0 1M", "write -z 64k 64k", "write -P 0x23 2000000 33333")
			b.io(img, unalignedOps...)
			return img
		})
	}

	// Zero clusters of both kinds, alone and over a backing file whose
	// data they must hide.
	add("zero-plain", func(b *builder) string {
		img := b.qcow2("z.qcow2", "4M")
		b.io(img, "write -P 0x24 0 2M", "write -z -u 128k 128k", "discard 512k 64k", "write -z 3M 64k", "write -z -u 300000 10000")
		return img
	})
	add("zero-alloc", func(b *builder) string {
		img := b.qcow2("z.qcow2", "4M")
		b.io(img, "write -P 0x25 0 1M", "write -z 64k 192k", "write -z 900000 5000")
		b.requireZeroAlloc(img)
		return img
	})
	add("zero-over-backing", func(b *builder) string {
		base := b.qcow2("base.qcow2", "4M")
		b.io(base, "write -P 0x26 0 4M")
		img := b.overlay("top.qcow2", "base.qcow2", "qcow2", "")
		b.io(img, "write -z -u 0 64k", "discard 1M 128k", "write -z 2M 64k", "write -P 0x27 3M 64k", "write -z 3M 64k", "write -z 3200000 1000")
		return img
	})

	// Compressed clusters, zlib and zstd, through qemu-img convert -c
	// (incompressible clusters fall back to plain ones) and qemu-io
	// write -c.
	for _, ct := range []string{"zlib", "zstd"} {
		for _, cl := range []string{"4k", "64k", "2M"} {
			add("convert-c-"+ct+"-c"+cl, func(b *builder) string {
				src := b.raw("src.raw", 12<<20, mixed(24<<10, 1))
				img := b.convert(src, "c.qcow2", "-f", "raw", "-c", "-o", "compression_type="+ct+",cluster_size="+cl)
				b.requireCompressed(img)
				return img
			})
		}
	}
	add("write-c-zlib-c512", func(b *builder) string {
		img := b.qcow2("c.qcow2", "4M", "-o", "cluster_size=512")
		b.io(img, "write -c -P 0x28 0 4k", "write -c -P 0x29 1M 512", "write -P 0x2a 2M 512", "write -z 512 512", "write -P 0x2b 1536 100")
		b.requireCompressed(img)
		return img
	})
	add("write-c-zstd-c64k", func(b *builder) string {
		img := b.qcow2("c.qcow2", "4M", "-o", "compression_type=zstd")
		b.io(img, "write -c -P 0x2c 0 256k", "write -c -P 0x2d 1M 64k", "write -P 0x2e 100001 7777", "write -z 192k 64k")
		b.requireCompressed(img)
		return img
	})
	add("write-c-zstd-c2M", func(b *builder) string {
		img := b.qcow2("c.qcow2", "8M", "-o", "compression_type=zstd,cluster_size=2M")
		b.io(img, "write -c -P 0x2f 0 2M", "write -c -P 0x30 4M 2M", "write -P 0x31 5000000 3333")
		b.requireCompressed(img)
		return img
	})

	// Extended L2 entries (subclusters) over patterned backing files.
	add("extl2-c64k-over-qcow2", func(b *builder) string {
		base := b.qcow2("base.qcow2", "4M")
		b.io(base, "write -P 0x32 0 2M", "write -P 0x33 3M 512k")
		img := b.overlay("top.qcow2", "base.qcow2", "qcow2", "", "-o", "extended_l2=on")
		b.io(img,
			"write -P 0x34 8k 4k",         // subclusters 4 and 5
			"write -P 0x35 100001 7777",   // partial subclusters
			"write -z 64k 2k",             // one zero subcluster, cluster unallocated
			"write -z 256k 64k",           // a whole zero cluster
			"write -z -u 320k 64k",        //
			"discard 512k 32k",            // half a cluster
			"write -P 0x36 1M 64k",        // a full cluster
			"write -z 1052672 2048",       // a zero subcluster in it
			"write -P 0x37 2050000 3000",  // over a hole of the base
			"write -P 0x38 3100000 1",     // one byte
			"write -P 0x39 3670016 65536", // past the base's data
		)
		return img
	})
	add("extl2-c2M-over-raw", func(b *builder) string {
		b.raw("base.raw", 8<<20, pattern(0x3a))
		img := b.overlay("top.qcow2", "base.raw", "raw", "", "-o", "extended_l2=on,cluster_size=2M")
		b.io(img, "write -P 0x3b 65536 65536", "write -P 0x3c 3000000 12345", "write -z 4M 64k", "write -z -u 6M 2M", "write -P 0x3d 6M 100")
		return img
	})
	add("extl2-c32k-no-backing", func(b *builder) string {
		img := b.qcow2("x.qcow2", "4M", "-o", "extended_l2=on,cluster_size=32k")
		b.io(img, "write -P 0x3e 1024 1024", "write -P 0x3f 40000 5000", "write -z 64k 1k", "write -P 0x40 1M 32k", "write -z 1M 1k")
		b.io(img, unalignedOps...)
		return img
	})

	// Internal snapshots: the mount shows the active state.
	add("snapshots-v3", func(b *builder) string {
		img := b.qcow2("s.qcow2", "4M")
		b.io(img, "write -P 0x41 0 2M")
		b.snapshot(img, "s1")
		b.io(img, "write -P 0x42 64k 64k", "write -z 512k 64k", "discard 1M 64k", "write -P 0x43 3M 4k")
		b.snapshot(img, "s2")
		b.io(img, "write -P 0x44 100001 7777", "write -z -u 1536k 128k")
		return img
	})
	add("snapshots-v2", func(b *builder) string {
		img := b.qcow2("s.qcow2", "4M", "-o", "compat=0.10,cluster_size=4k")
		b.io(img, "write -P 0x45 0 1M")
		b.snapshot(img, "before")
		b.io(img, "write -P 0x46 4k 8k", "discard 512k 64k", "write -P 0x47 100001 7777")
		return img
	})
	add("snapshots-extl2", func(b *builder) string {
		img := b.qcow2("s.qcow2", "4M", "-o", "extended_l2=on")
		b.io(img, "write -P 0x48 8k 4k", "write -P 0x49 1M 64k")
		b.snapshot(img, "s1")
		b.io(img, "write -P 0x4a 16k 2k", "write -z 1M 2k", "write -P 0x4b 1050000 999")
		return img
	})

	// Short host files: fresh images end inside their L1 cluster.
	for _, cl := range []struct {
		name string
		size int64
	}{{"64k", 64 << 10}, {"2M", 2 << 20}} {
		add("fresh-c"+cl.name, func(b *builder) string {
			img := b.qcow2("f.qcow2", "64M", "-o", "cluster_size="+cl.name)
			if !l1PastEOF(b.t, img, cl.size) {
				b.t.Fatalf("%s: fresh image does not end inside its L1 cluster", img)
			}
			return img
		})
	}
	add("fresh-overlay", func(b *builder) string {
		base := b.qcow2("base.qcow2", "4M", "-o", "cluster_size=4k")
		b.io(base, "write -P 0x4c 0 4M")
		img := b.overlay("top.qcow2", "base.qcow2", "qcow2", "8M")
		if !l1PastEOF(b.t, img, 64<<10) {
			b.t.Fatalf("%s: fresh image does not end inside its L1 cluster", img)
		}
		return img
	})

	// Backing chains mixing qcow2 and raw layers.
	add("chain3-raw-v2-extl2", func(b *builder) string {
		b.raw("base.raw", 6<<20, pattern(0x4d))
		mid := b.overlay("mid.qcow2", "base.raw", "raw", "", "-o", "compat=0.10,cluster_size=4k")
		b.io(mid, "write -P 0x4e 1M 1M", "write -P 0x4f 100001 7777", "discard 3M 64k")
		img := b.overlay("top.qcow2", "mid.qcow2", "qcow2", "", "-o", "extended_l2=on")
		b.io(img, "write -P 0x50 1040000 4096", "write -z 2M 128k", "write -P 0x51 5M 64k")
		return img
	})
	add("chain3-qcow2-mixed-clusters", func(b *builder) string {
		base := b.qcow2("base.qcow2", "8M", "-o", "cluster_size=2M")
		b.io(base, "write -P 0x52 0 8M")
		mid := b.overlay("mid.qcow2", "base.qcow2", "qcow2", "", "-o", "cluster_size=512")
		b.io(mid, "write -z 1M 1M", "write -P 0x53 2000000 1000", "write -z -u 5M 512")
		img := b.overlay("top.qcow2", "mid.qcow2", "qcow2", "")
		b.io(img, "write -P 0x54 1M 64k", "discard 6M 64k", "write -P 0x55 7000001 77")
		return img
	})
	add("chain5", func(b *builder) string {
		b.raw("l0.raw", 4<<20, pattern(0x56))
		prev, prevFmt := "l0.raw", "raw"
		for i := 1; i <= 4; i++ {
			name := "l" + strconv.Itoa(i) + ".qcow2"
			img := b.overlay(name, prev, prevFmt, "", "-o", "cluster_size=4k")
			b.io(img, "write -P "+strconv.Itoa(0x60+i)+" "+strconv.Itoa(i*512*1024+i*1111)+" 70000")
			prev, prevFmt = name, "qcow2"
		}
		return b.path(prev)
	})

	// Backing files shorter than their overlay read as zeros past their
	// end.
	add("short-backing-qcow2", func(b *builder) string {
		base := b.qcow2("base.qcow2", "1M")
		b.io(base, "write -P 0x57 0 1M")
		img := b.overlay("top.qcow2", "base.qcow2", "qcow2", "4M")
		b.io(img, "write -P 0x58 1000000 100000", "write -P 0x59 3M 4k")
		return img
	})
	add("short-backing-raw-unaligned", func(b *builder) string {
		b.raw("base.raw", 1000000, pattern(0x5a))
		img := b.overlay("top.qcow2", "base.raw", "raw", "4M", "-o", "cluster_size=4k")
		b.io(img, "write -P 0x5b 999000 2000", "write -P 0x5c 2M 4k")
		return img
	})

	// Backing names resolve against the naming image's directory:
	// chain/top.qcow2 names sub/mid.qcow2, which names base.raw (that is,
	// chain/sub/base.raw). Decoys with other contents sit where a
	// resolution against the working directory would look.
	relChain := func(b *builder) string {
		b.raw("chain/sub/base.raw", 4<<20, pattern(0x5d))
		mid := b.overlay("chain/sub/mid.qcow2", "base.raw", "raw", "")
		b.io(mid, "write -P 0x5e 1M 64k")
		img := b.overlay("chain/top.qcow2", "sub/mid.qcow2", "qcow2", "")
		b.io(img, "write -P 0x5f 2M 100001")
		b.raw("base.raw", 4<<20, pattern(0x60))
		b.raw("chain/base.raw", 4<<20, pattern(0x61))
		decoy := b.qcow2("sub/mid.qcow2", "4M")
		b.io(decoy, "write -P 0x62 0 4M")
		return img
	}
	add("relative-names", relChain)
	cs = append(cs, imageCase{name: "relative-names-relative-image", build: func(b *builder) (string, string) {
		relChain(b)
		return "chain/top.qcow2", b.dir
	}})

	// Compressed bases under extended-L2 overlays.
	add("compressed-zstd-base-under-extl2", func(b *builder) string {
		src := b.raw("src.raw", 4<<20, mixed(40<<10, 2))
		b.requireCompressed(b.convert(src, "base.qcow2", "-f", "raw", "-c", "-o", "compression_type=zstd"))
		img := b.overlay("top.qcow2", "base.qcow2", "qcow2", "", "-o", "extended_l2=on")
		b.io(img, "write -P 0x63 8k 4k", "write -P 0x64 100001 7777", "write -z 1M 2k", "write -P 0x65 2050000 30000")
		return img
	})
	add("compressed-zlib-c4k-base-under-extl2-c32k", func(b *builder) string {
		src := b.raw("src.raw", 4<<20, mixed(12<<10, 3))
		b.requireCompressed(b.convert(src, "base.qcow2", "-f", "raw", "-c", "-o", "cluster_size=4k"))
		img := b.overlay("top.qcow2", "base.qcow2", "qcow2", "", "-o", "extended_l2=on,cluster_size=32k")
		b.io(img, "write -P 0x66 1024 1024", "write -P 0x67 50001 3333", "write -z -u 64k 32k")
		b.io(img, unalignedOps...)
		return img
	})

	// Odds and ends qemu makes.
	add("unaligned-size", func(b *builder) string {
		img := b.qcow2("u.qcow2", "5243392", "-o", "cluster_size=4k") // 5 MiB + 512
		b.io(img, unalignedOps...)
		b.io(img, "write -P 0x68 5242880 512", "write -z 1000100 100")
		return img
	})
	add("lazy-refcounts-dirty", func(b *builder) string {
		img := b.qcow2("l.qcow2", "4M", "-o", "lazy_refcounts=on")
		// abort leaves the dirty bit set and the refcounts stale; qemu-io
		// dies of SIGABRT, as intended.
		_, _, err := testutil.RunErr(b.t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x69 0 256k", "-c", "write -P 0x6a 1000001 5000", "-c", "abort", img)
		if err == nil {
			b.t.Fatal("qemu-io abort: exited normally")
		}
		return img
	})
	add("bitmaps", func(b *builder) string {
		img := b.qcow2("b.qcow2", "4M")
		testutil.Img(b.t, "bitmap", "--add", img, "bm0")
		testutil.Img(b.t, "bitmap", "--add", "-g", "128k", img, "bm1")
		testutil.Img(b.t, "bitmap", "--disable", img, "bm1")
		b.io(img, "write -P 0x6b 0 100k", "write -P 0x6c 2M 4k")
		return img
	})
	add("prealloc-metadata", func(b *builder) string {
		img := b.qcow2("p.qcow2", "4M", "-o", "preallocation=metadata")
		b.io(img, "write -P 0x6d 100001 7777", "write -z 1M 64k")
		return img
	})
	add("prealloc-metadata-extl2", func(b *builder) string {
		img := b.qcow2("p.qcow2", "4M", "-o", "preallocation=metadata,extended_l2=on")
		b.io(img, "write -P 0x6e 100001 7777", "write -z 1M 2k")
		return img
	})
	return cs
}

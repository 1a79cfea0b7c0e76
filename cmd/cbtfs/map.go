package main

import (
	"context"

	"github.com/cbtfs/cbtfs/internal/report"
	"github.com/cbtfs/cbtfs/qcow"
)

type mapCmd struct {
	Bitmap     string `help:"List the dirty and clean extents of bitmap NAME (the union across the chain)." placeholder:"NAME" xor:"ctx"`
	Depth      bool   `help:"List qemu:allocation-depth extents instead of base:allocation." xor:"ctx"`
	JSON       bool   `help:"Print JSON as nbdinfo --map --json does."`
	ForceShare bool   `short:"U" help:"Open without locks, like qemu-img -U (to look at an image another process has open for writing)."`
	Image      string `arg:"" help:"The top qcow2 image of the chain."`
}

// Run prints the listing exactly as nbdinfo --map[=CONTEXT] [--json]
// prints it against qemu-nbd serving the same chain.
func (c *mapCmd) Run(ctx context.Context, g *Globals) error {
	img, err := qcow.Open(c.Image, &qcow.Options{Logger: g.logger(), ForceShare: c.ForceShare})
	if err != nil {
		return err
	}
	defer img.Close()
	var l *report.Listing
	switch {
	case c.Bitmap != "":
		m, err := img.Bitmap(c.Bitmap)
		if err != nil {
			return err
		}
		l = report.Bitmap(c.Bitmap, m)
	case c.Depth:
		l, err = report.Depth(img)
	default:
		l, err = report.Allocation(img)
	}
	if err != nil {
		return err
	}
	out := l.Text()
	if c.JSON {
		out = l.JSON()
	}
	_, err = g.stdout.Write(out)
	return err
}

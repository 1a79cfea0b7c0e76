package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/cbtfs/cbtfs/internal/units"
	"github.com/cbtfs/cbtfs/qcow"
)

type createCmd struct {
	Backing       string `help:"Backing file, stored as given (a relative name is relative to IMAGE's directory)." placeholder:"FILE"`
	BackingFormat string `help:"Format of the backing file: qcow2 or raw (default: probed)." enum:"qcow2,raw," default:""`
	ClusterSize   string `help:"Cluster size, a power of two from 512 to 2M." default:"64K" placeholder:"SIZE"`
	Image         string `arg:"" help:"The image to create (must not exist)."`
	Size          string `arg:"" optional:"" help:"Virtual size (K, M, G, T are powers of 1024); default: the backing file's size."`
}

func (c *createCmd) Run(ctx context.Context, g *Globals) error {
	o := qcow.CreateOptions{BackingFile: c.Backing, BackingFormat: c.BackingFormat}
	var err error
	if o.ClusterSize, err = units.ParseSize(c.ClusterSize); err != nil {
		return fmt.Errorf("--cluster-size: %w", err)
	}
	if o.ClusterSize == 0 {
		// qcow.Create reads 0 as the default; qemu-img refuses it.
		return fmt.Errorf("--cluster-size: cluster size 0: must be a power of two from 512 to 2M")
	}
	if c.Size != "" {
		if o.Size, err = units.ParseSize(c.Size); err != nil {
			return fmt.Errorf("size: %w", err)
		}
	} else if c.Backing == "" {
		return fmt.Errorf("%s: a size is needed without --backing", c.Image)
	}
	if c.BackingFormat != "" && c.Backing == "" {
		return fmt.Errorf("--backing-format needs --backing")
	}
	return nameImage(c.Image, qcow.Create(c.Image, o))
}

// nameImage makes sure that an error about image names it, as every
// error of the command line does.
func nameImage(image string, err error) error {
	if err == nil || strings.Contains(err.Error(), image) {
		return err
	}
	return fmt.Errorf("%s: %w", image, err)
}

type bitmapCmd struct {
	Granularity *string  `help:"Granularity of a new bitmap (default: the cluster size clamped to 4K..64K)." placeholder:"SIZE"`
	Disabled    bool     `help:"Add the bitmap disabled: writes do not mark it."`
	Image       string   `arg:"" help:"The qcow2 image (the top of its chain)."`
	Op          string   `arg:"" enum:"add,remove,clear,enable,disable,merge" help:"add, remove, clear, enable, disable or merge."`
	Names       []string `arg:"" help:"NAME, or SRC DST for merge."`
}

// Run changes the image's bitmaps like qemu-img bitmap: the image is
// opened for writing, changed, and closed cleanly (bitmaps stored, in-use
// flags cleared).
func (c *bitmapCmd) Run(ctx context.Context, g *Globals) error {
	want := 1
	if c.Op == "merge" {
		want = 2
	}
	if len(c.Names) != want {
		return fmt.Errorf("bitmap %s needs %d name(s), got %d", c.Op, want, len(c.Names))
	}
	if (c.Granularity != nil || c.Disabled) && c.Op != "add" {
		return fmt.Errorf("--granularity and --disabled apply to add only")
	}
	var gran uint64
	if c.Granularity != nil {
		// Given, even empty ("--granularity="), it must be a size.
		var err error
		if gran, err = units.ParseSize(*c.Granularity); err != nil {
			return fmt.Errorf("--granularity: %w", err)
		}
		if gran == 0 {
			return fmt.Errorf("--granularity: must not be 0")
		}
	}
	img, err := qcow.Open(c.Image, &qcow.Options{Logger: g.logger(), Writable: true})
	if err != nil {
		return err
	}
	name := c.Names[0]
	switch c.Op {
	case "add":
		err = img.AddBitmap(name, gran, c.Disabled)
	case "remove":
		err = img.RemoveBitmap(name)
	case "clear":
		err = img.ClearBitmap(name)
	case "enable":
		err = img.EnableBitmap(name, true)
	case "disable":
		err = img.EnableBitmap(name, false)
	case "merge":
		err = img.MergeBitmap(c.Names[0], c.Names[1])
	}
	err = nameImage(c.Image, err)
	if cerr := img.Close(); err == nil {
		err = cerr
	}
	return err
}

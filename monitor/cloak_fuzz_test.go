package monitor

import (
	"testing"

	"github.com/umbra-cc/umbra/appcontext"
)

// FuzzCloakGuestTables feeds arbitrary guest page tables to the two places the
// cloaking monitor walks them outside appcontext: the survey of a registration's
// regions (presentPages) and the check of an app's shadow entries at resume
// (checkMappings). Neither may panic, loop, or accept a frame outside RAM.
func FuzzCloakGuestTables(f *testing.F) {
	f.Add(make([]byte, 4*PageSize), uint64(0x400000), uint64(0x10000), uint64(0))
	seed := make([]byte, 4*PageSize)
	put := func(off int, v uint64) {
		for i := 0; i < 8; i++ {
			seed[off+i] = byte(v >> (8 * i))
		}
	}
	put(0, 0x1000|7)
	put(0x1000, 0x2000|7)
	put(0x2000+2*8, 0x3000|7)
	put(0x3000, 0x5000|7)
	put(0x3008, 0x400|0x8000) // paged out
	f.Add(seed, uint64(0x400000), uint64(0x4000), uint64(0x7fffffff0000))
	const ram = 1 << 20
	mem, err := NewGuestMemory(ram)
	if err != nil {
		f.Skip(err)
	}
	defer mem.Close()
	f.Fuzz(func(t *testing.T, tables []byte, va, size, deadBelow uint64) {
		all, _ := mem.Slice(0, ram)
		clear(all)
		mem.WritePhys(0, tables[:min(len(tables), ram)])
		c := &cloaking{host: vmCloakHost{&VM{mem: mem, maxPhysAddr: 36}}, ram: mem, plain: map[uint64]plainOwner{}}
		as := appcontext.AddressSpace{Mem: mem, CR3: 0, Paging: appcontext.Paging{MaxPhysAddr: 36, NXE: true, WP: true}}
		va &^= PageSize - 1
		size = min(size&^(PageSize-1), 8<<20)
		if size == 0 || va < PageSize || va+size > appcontext.UserTop || va+size < va {
			return
		}
		for _, kind := range []appcontext.RegionKind{appcontext.RegionImage, appcontext.RegionStack} {
			pages, err := c.presentPages(as, []appcontext.Region{{VA: va, Size: size, Kind: kind}}, deadBelow)
			if err != nil {
				if appcontext.ErrnoOf(err) == 0 {
					t.Fatalf("error without errno: %v", err)
				}
				continue
			}
			seen := map[uint64]bool{}
			for _, p := range pages {
				if p[1]%PageSize != 0 || p[1]+PageSize > ram || seen[p[1]] || p[0] < va || p[0] >= va+size {
					t.Fatalf("bad page %#x -> %#x", p[0], p[1])
				}
				seen[p[1]] = true
			}
		}
		// checkMappings drops whatever does not match; it must not touch anything
		// else (no appVM here: only entries that still match may remain).
		x := &cloakApp{c: c, cr3: 0, paging: as.Paging, mapped: map[uint64]shadowMap{}, sm: nil}
		x.mapped[va] = shadowMap{gpa: 0x5000, writable: true}
		c.checkMappings(x)
		if len(x.mapped) > 1 {
			t.Fatal("checkMappings added entries")
		}
		if m, ok := x.mapped[va]; ok {
			tr, err := as.Paging.Walk(mem, 0, va, appcontext.UserRead)
			if err != nil || tr.GPA&^(PageSize-1) != m.gpa || !tr.Writable || tr.NoExec {
				t.Fatalf("stale entry kept: %+v for %+v, %v", m, tr, err)
			}
		}
	})
}

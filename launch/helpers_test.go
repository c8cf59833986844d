package launch

import "github.com/umbra-cc/umbra/internal/testenv"

var (
	requireKVM = testenv.RequireKVM
	testELF    = testenv.ELF
	// 1: jmp 1b
	guestSpin = []byte{0xeb, 0xfe}
)

// testLoad is where the test ELF is loaded (guest-physical and virtual).
const testLoad = 0x100000

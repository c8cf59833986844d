package main

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/input"
	"github.com/chromedp/chromedp"

	"github.com/umbra-cc/umbra/serve"
)

// artefactDir is where the browser test keeps its screenshots: $UMBRA_TEST_ARTEFACTS
// or a fixed directory under the system's temporary directory.
func artefactDir(t *testing.T) string {
	dir := os.Getenv("UMBRA_TEST_ARTEFACTS")
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "umbra-test-artefacts")
	}
	dir = filepath.Join(dir, "serve-browser")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestServeBrowserConsole drives headless Chromium against umbra serve: log in, open
// the VM's console through the two tickets, type into the guest and see its answer,
// detach, open the audit timeline and see the session recorded, and open the
// `umbra audit report` of the same log and see verify's verdict. Screenshots of each
// step are kept (artefactDir).
func TestServeBrowserConsole(t *testing.T) {
	chromium, err := exec.LookPath("chromium")
	if err != nil {
		t.Skip("no chromium on PATH (Debian package chromium; make deps installs it)")
	}
	evPath, refPath, nonce := swtpmEvidence(t)
	s := newServeFixture(t, 0, "--evidence", evPath, "--reference", refPath, "--nonce", nonce)
	art := artefactDir(t)
	// Trust exactly the server's generated certificate (its SPKI pin), nothing else.
	block, _ := pem.Decode(mustRead(t, s.f.path("serve.pem")))
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	spki := sha256.Sum256(cert.RawSubjectPublicKeyInfo)
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium),
		chromedp.NoSandbox,
		chromedp.Flag("ignore-certificate-errors-spki-list", base64.StdEncoding.EncodeToString(spki[:])),
		chromedp.WindowSize(1280, 900),
	)
	actx, cancel := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancel()
	ctx, cancel := chromedp.NewContext(actx)
	defer cancel()
	// The first run starts the browser; it must not have a timeout (chromedp.Run).
	if err := chromedp.Do(ctx, chromedp.Navigate(s.base+"/login")); err != nil {
		t.Fatalf("browser: %v", err)
	}
	ctx, cancel = context.WithTimeout(ctx, 4*time.Minute)
	defer cancel()
	shot := func(name string) chromedp.Action[chromedp.Void] {
		return chromedp.Func(func(ctx context.Context, tg *chromedp.Target) error {
			b, err := chromedp.FullScreenshot(100)(ctx, tg) // quality 100: PNG
			if err != nil {
				return err
			}
			return os.WriteFile(filepath.Join(art, name), b, 0o644)
		})
	}
	text := func(ctx context.Context, tg *chromedp.Target, sel string) (string, error) {
		return chromedp.TextContent(chromedp.CSS(sel))(ctx, tg)
	}
	waitText := func(sel, want string) chromedp.Action[chromedp.Void] {
		return chromedp.Func(func(ctx context.Context, tg *chromedp.Target) error {
			step, cancel := context.WithTimeout(ctx, 20*time.Second)
			defer cancel()
			var got string
			for {
				var err error
				if got, err = text(step, tg, sel); err == nil && strings.Contains(got, want) {
					return nil
				}
				select {
				case <-step.Done():
					html, _ := chromedp.OuterHTML(chromedp.CSS("body"))(ctx, tg)
					t.Errorf("%s never showed %q; it shows:\n%s\npage:\n%s", sel, want, got, html)
					shot("failed.png")(ctx, tg)
					return step.Err()
				case <-time.After(100 * time.Millisecond):
				}
			}
		})
	}
	err = chromedp.Do(ctx,
		chromedp.WaitVisible(chromedp.CSS("#token")),
		chromedp.SendKeys(chromedp.CSS("#token"), s.tokens["alice"]),
		shot("1-login.png"),
		chromedp.Click(chromedp.CSS("#submit")),
		waitText("#vms tbody", "running"),
		shot("2-vms.png"),
		chromedp.Click(chromedp.CSS("a.console-link")),
		waitText("#status", "attached"),
		waitText(".xterm-rows", "chat: ready"),
		chromedp.Focus(chromedp.CSS("textarea.xterm-helper-textarea")),
		typeLine("hello browser"),
		waitText(".xterm-rows", "chat: got hello browser (line 1)"),
		shot("3-console.png"),
		chromedp.Click(chromedp.CSS("#detach")),
		waitText("#status", "detached"),
	)
	if err != nil {
		t.Fatalf("browser: %v", err)
	}
	if p := s.f.ps("demo"); p.State != "running" {
		t.Fatalf("after the browser detached: %+v", p)
	}
	waitAudit(t, s, func(v *serve.AuditView) bool { return count(v, "console-session-end", "client detached") > 0 })
	err = chromedp.Do(ctx,
		chromedp.Navigate(s.base+"/audit"),
		waitText("#timeline tbody", "console-session-end"),
		waitText("#timeline tbody", "console-session-open"),
		waitText("#verdict", "Log verification: pass"),
		waitText("#evidence-verdict", "Evidence verification: pass"),
		waitText("#evidence", "RESULT: PASS"),
		shot("4-audit.png"),
		// The filters: ALLOW records of kind console-session-open only.
		chromedp.SetValue(chromedp.CSS("#f-verdict"), "ALLOW"),
		chromedp.SetValue(chromedp.CSS("#f-kind"), "console-session-open"),
		chromedp.Click(chromedp.CSS("#filters button")),
	)
	if err != nil {
		t.Fatalf("browser: %v", err)
	}
	// The filtered table has the session's open and nothing else.
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		filtered, _ := chromedp.Run(ctx, chromedp.TextContent(chromedp.CSS("#timeline tbody")))
		if strings.Contains(filtered, "console-session-open") && !strings.Contains(filtered, "console-session-end") && !strings.Contains(filtered, "decision") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the filters did not narrow the timeline:\n%s", filtered)
		}
	}
	if err := chromedp.Do(ctx, shot("5-audit-filtered.png")); err != nil {
		t.Fatal(err)
	}

	// The report of the same log shows verify's verdict.
	log := filepath.Join(s.f.state("demo"), "audit.jsonl")
	_, vout, _ := runUmbra(t, "audit", "verify", log)
	report := filepath.Join(art, "report.html")
	if code, _, errs := runUmbra(t, "audit", "report", log, "-o", report); code != 0 {
		t.Fatalf("audit report: %d %s", code, errs)
	}
	if err := chromedp.Do(ctx, chromedp.Navigate("file://"+report), shot("6-report.png")); err != nil {
		t.Fatalf("browser: %v", err)
	}
	verdict, err1 := chromedp.Run(ctx, chromedp.TextContent(chromedp.CSS("#verdict")))
	vtext, err2 := chromedp.Run(ctx, chromedp.TextContent(chromedp.CSS("#verify")))
	if err1 != nil || err2 != nil || verdict != "pass" || !strings.Contains(vout, "RESULT: PASS") || strings.TrimSpace(vtext) != strings.TrimSpace(vout) {
		t.Fatalf("report shows %q (%v %v) and\n%s\nverify says:\n%s", verdict, err1, err2, vtext, vout)
	}
	t.Logf("screenshots in %s", art)
}

// typeLine types text into the focused element as a person's keyboard would reach
// xterm.js: the text as one input, then the Enter key (a raw key-down, as for a key
// without text, so xterm sends exactly one "\r").
func typeLine(text string) chromedp.Action[chromedp.Void] {
	return chromedp.Func(func(ctx context.Context, tg *chromedp.Target) error {
		if _, err := cdp.Call(ctx, tg, input.InsertText, input.InsertTextParams{Text: text}); err != nil {
			return err
		}
		for _, typ := range []input.DispatchKeyEventType{input.DispatchKeyEventTypeRawKeyDown, input.DispatchKeyEventTypeKeyUp} {
			if _, err := cdp.Call(ctx, tg, input.DispatchKeyEvent, input.DispatchKeyEventParams{Type: typ, Key: "Enter", Code: "Enter", WindowsVirtualKeyCode: 13}); err != nil {
				return err
			}
		}
		return nil
	})
}

func mustRead(t *testing.T, p string) []byte {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

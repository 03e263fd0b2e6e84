package main

// Key and certificate material for the local control plane. Everything is
// generated once into <dir>/pki and reused on every later start, so a
// kubeconfig handed out earlier keeps working across restarts.

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// pki holds the paths of all generated files.
type pki struct {
	Dir string

	CACert, CAKey             string // serving CA (trusted by clients)
	ServingCert, ServingKey   string // kube-apiserver serving certificate
	ClientCACert, ClientCAKey string // CA for client certificates (--client-ca-file)
	AdminCert, AdminKey       string // admin client certificate (system:masters)
	SAKey, SAPub              string // service account signing key pair

	// Only with a node (see nodePKI): the kubelet's and kube-proxy's client
	// certificates, the kubelet's serving certificate and the apiserver's
	// client certificate for the kubelet API.
	KubeletClientCert, KubeletClientKey   string
	KubeletServingCert, KubeletServingKey string
	ProxyClientCert, ProxyClientKey       string
	APIKubeletCert, APIKubeletKey         string
}

const (
	caValidity   = 10 * 365 * 24 * time.Hour
	leafValidity = 10 * 365 * 24 * time.Hour
	rsaBits      = 2048

	adminUser  = "kube-sts-admin"
	adminGroup = "system:masters"
)

func newPKI(dir string) *pki {
	d := filepath.Join(dir, "pki")
	return &pki{
		Dir:          d,
		CACert:       filepath.Join(d, "ca.crt"),
		CAKey:        filepath.Join(d, "ca.key"),
		ServingCert:  filepath.Join(d, "apiserver.crt"),
		ServingKey:   filepath.Join(d, "apiserver.key"),
		ClientCACert: filepath.Join(d, "client-ca.crt"),
		ClientCAKey:  filepath.Join(d, "client-ca.key"),
		AdminCert:    filepath.Join(d, "admin.crt"),
		AdminKey:     filepath.Join(d, "admin.key"),
		SAKey:        filepath.Join(d, "sa.key"),
		SAPub:        filepath.Join(d, "sa.pub"),

		KubeletClientCert:  filepath.Join(d, "kubelet-client.crt"),
		KubeletClientKey:   filepath.Join(d, "kubelet-client.key"),
		KubeletServingCert: filepath.Join(d, "kubelet-serving.crt"),
		KubeletServingKey:  filepath.Join(d, "kubelet-serving.key"),
		ProxyClientCert:    filepath.Join(d, "kube-proxy.crt"),
		ProxyClientKey:     filepath.Join(d, "kube-proxy.key"),
		APIKubeletCert:     filepath.Join(d, "apiserver-kubelet-client.crt"),
		APIKubeletKey:      filepath.Join(d, "apiserver-kubelet-client.key"),
	}
}

// ensure creates whatever is missing. Existing files are reused as they are;
// a leaf whose issuing CA had to be regenerated is regenerated too, and so is
// a serving certificate that lacks one of the addresses it must name (the
// node's link address appears when a node is added to an existing state).
// With a node (n != nil) it also creates the node's certificates.
func (p *pki) ensure(n *nodeConfig) error {
	if err := os.MkdirAll(p.Dir, 0o700); err != nil {
		return err
	}

	ca, caKey, caNew, err := p.ensureCA(p.CACert, p.CAKey, "kube-sts-e2e-ca")
	if err != nil {
		return fmt.Errorf("serving CA: %w", err)
	}
	clientCA, clientCAKey, clientCANew, err := p.ensureCA(p.ClientCACert, p.ClientCAKey, "kube-sts-e2e-client-ca")
	if err != nil {
		return fmt.Errorf("client CA: %w", err)
	}

	servingIPs := []net.IP{
		net.ParseIP("127.0.0.1"), net.ParseIP("::1"),
		net.ParseIP("10.0.0.1"), // first IP of the service range: the "kubernetes" Service
	}
	if n != nil {
		servingIPs = append(servingIPs, n.hostAddress)
	}
	if caNew || !pairExists(p.ServingCert, p.ServingKey) || !certNamesIPs(p.ServingCert, servingIPs) {
		tmpl := &x509.Certificate{
			Subject:     pkix.Name{CommonName: "kube-apiserver"},
			KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			DNSNames: []string{
				"localhost",
				"kubernetes", "kubernetes.default", "kubernetes.default.svc",
				"kubernetes.default.svc.cluster.local",
			},
			IPAddresses: servingIPs,
		}
		if err := issueLeaf(tmpl, ca, caKey, p.ServingCert, p.ServingKey); err != nil {
			return fmt.Errorf("serving certificate: %w", err)
		}
	}

	if clientCANew || !pairExists(p.AdminCert, p.AdminKey) {
		tmpl := &x509.Certificate{
			Subject:     pkix.Name{CommonName: adminUser, Organization: []string{adminGroup}},
			KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		}
		if err := issueLeaf(tmpl, clientCA, clientCAKey, p.AdminCert, p.AdminKey); err != nil {
			return fmt.Errorf("admin client certificate: %w", err)
		}
	}

	if n != nil {
		if err := p.ensureNode(n, ca, caKey, caNew, clientCA, clientCAKey, clientCANew); err != nil {
			return err
		}
	}

	if !pairExists(p.SAKey, p.SAPub) {
		key, err := rsa.GenerateKey(rand.Reader, rsaBits)
		if err != nil {
			return err
		}
		pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
		if err != nil {
			return err
		}
		if err := writePEM(p.SAKey, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(key), 0o600); err != nil {
			return err
		}
		if err := writePEM(p.SAPub, "PUBLIC KEY", pub, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// ensureNode creates the certificates a node needs: client certificates of
// the kubelet (system:node:<name> in system:nodes, for the Node authorizer)
// and of kube-proxy (system:kube-proxy, bound to system:node-proxier by
// default RBAC), the apiserver's client certificate for the kubelet API
// (system:masters), and the kubelet's serving certificate for the node's
// address, signed by the serving CA so the apiserver can verify it.
func (p *pki) ensureNode(n *nodeConfig, ca *x509.Certificate, caKey *rsa.PrivateKey, caNew bool,
	clientCA *x509.Certificate, clientCAKey *rsa.PrivateKey, clientCANew bool) error {
	clients := []struct {
		cert, key string
		subject   pkix.Name
	}{
		{p.KubeletClientCert, p.KubeletClientKey, pkix.Name{CommonName: "system:node:" + n.name, Organization: []string{"system:nodes"}}},
		{p.ProxyClientCert, p.ProxyClientKey, pkix.Name{CommonName: "system:kube-proxy"}},
		{p.APIKubeletCert, p.APIKubeletKey, pkix.Name{CommonName: "kube-apiserver-kubelet-client", Organization: []string{adminGroup}}},
	}
	for _, c := range clients {
		if !clientCANew && pairExists(c.cert, c.key) && certSubject(c.cert) == c.subject.String() {
			continue
		}
		tmpl := &x509.Certificate{
			Subject:     c.subject,
			KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		}
		if err := issueLeaf(tmpl, clientCA, clientCAKey, c.cert, c.key); err != nil {
			return fmt.Errorf("%s: %w", c.cert, err)
		}
	}
	ips := []net.IP{n.address}
	if caNew || !pairExists(p.KubeletServingCert, p.KubeletServingKey) || !certNamesIPs(p.KubeletServingCert, ips) ||
		certSubject(p.KubeletServingCert) != (pkix.Name{CommonName: n.name}).String() {
		tmpl := &x509.Certificate{
			Subject:     pkix.Name{CommonName: n.name},
			KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			DNSNames:    []string{n.name},
			IPAddresses: ips,
		}
		if err := issueLeaf(tmpl, ca, caKey, p.KubeletServingCert, p.KubeletServingKey); err != nil {
			return fmt.Errorf("kubelet serving certificate: %w", err)
		}
	}
	return nil
}

// loadCert reads the first certificate of a PEM file (nil when unreadable).
func loadCert(path string) *x509.Certificate {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	block, _ := pem.Decode(data)
	if block == nil {
		return nil
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil
	}
	return cert
}

// certNamesIPs tells whether the certificate names every one of ips.
func certNamesIPs(path string, ips []net.IP) bool {
	cert := loadCert(path)
	if cert == nil {
		return false
	}
	for _, ip := range ips {
		found := false
		for _, have := range cert.IPAddresses {
			if have.Equal(ip) {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

func certSubject(path string) string {
	if cert := loadCert(path); cert != nil {
		return cert.Subject.String()
	}
	return ""
}

// ensureCA loads the CA from disk or creates it. The bool is true when a new
// CA was created.
func (p *pki) ensureCA(certPath, keyPath, cn string) (*x509.Certificate, *rsa.PrivateKey, bool, error) {
	if pairExists(certPath, keyPath) {
		pair, err := tls.LoadX509KeyPair(certPath, keyPath)
		if err != nil {
			return nil, nil, false, err
		}
		cert, err := x509.ParseCertificate(pair.Certificate[0])
		if err != nil {
			return nil, nil, false, err
		}
		key, ok := pair.PrivateKey.(*rsa.PrivateKey)
		if !ok {
			return nil, nil, false, fmt.Errorf("%s: not an RSA key", keyPath)
		}
		return cert, key, false, nil
	}

	key, err := rsa.GenerateKey(rand.Reader, rsaBits)
	if err != nil {
		return nil, nil, false, err
	}
	serial, err := newSerial()
	if err != nil {
		return nil, nil, false, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(caValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		SubjectKeyId:          keyID(&key.PublicKey),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, false, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, false, err
	}
	if err := writePEM(keyPath, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(key), 0o600); err != nil {
		return nil, nil, false, err
	}
	if err := writePEM(certPath, "CERTIFICATE", der, 0o644); err != nil {
		return nil, nil, false, err
	}
	return cert, key, true, nil
}

func issueLeaf(tmpl, ca *x509.Certificate, caKey *rsa.PrivateKey, certPath, keyPath string) error {
	key, err := rsa.GenerateKey(rand.Reader, rsaBits)
	if err != nil {
		return err
	}
	serial, err := newSerial()
	if err != nil {
		return err
	}
	now := time.Now()
	tmpl.SerialNumber = serial
	tmpl.NotBefore = now.Add(-time.Hour)
	tmpl.NotAfter = now.Add(leafValidity)
	tmpl.BasicConstraintsValid = true
	tmpl.IsCA = false
	tmpl.SubjectKeyId = keyID(&key.PublicKey)
	tmpl.AuthorityKeyId = ca.SubjectKeyId
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return err
	}
	if err := writePEM(keyPath, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(key), 0o600); err != nil {
		return err
	}
	return writePEM(certPath, "CERTIFICATE", der, 0o644)
}

func newSerial() (*big.Int, error) {
	// 127 bits keeps the DER integer positive and well under 20 bytes.
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
}

func keyID(pub *rsa.PublicKey) []byte {
	sum := sha1.Sum(x509.MarshalPKCS1PublicKey(pub))
	return sum[:]
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	tmp := path + ".tmp"
	data := pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
	if err := os.WriteFile(tmp, data, mode); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func pairExists(a, b string) bool {
	return fileExists(a) && fileExists(b)
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil || !errors.Is(err, os.ErrNotExist)
}

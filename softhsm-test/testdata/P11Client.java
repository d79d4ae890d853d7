// P11Client: the Java side of TestPKCS11Java. It loads the agent's token
// through SunPKCS11 and p11-kit-client.so with no PIN, lists its entries and
// makes one mTLS request with a key of the token.
//
//   java P11Client.java PROVIDER_CFG ROOT_PEM URL ALIAS PROTOCOL
import java.io.FileInputStream;
import java.io.InputStream;
import java.net.Socket;
import java.net.URL;
import java.security.Principal;
import java.security.PrivateKey;
import java.security.cert.X509Certificate;
import java.security.KeyStore;
import java.security.Provider;
import java.security.Security;
import java.security.cert.CertificateFactory;
import java.util.Collections;
import javax.net.ssl.HttpsURLConnection;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SSLContext;
import javax.net.ssl.TrustManagerFactory;
import javax.net.ssl.X509KeyManager;

public class P11Client {
    public static void main(String[] args) throws Exception {
        Provider p = Security.getProvider("SunPKCS11").configure(args[0]);
        Security.addProvider(p);
        KeyStore ks = KeyStore.getInstance("PKCS11", p);
        ks.load(null, null); // no PIN: the agent knows its caller from the kernel
        for (String alias : Collections.list(ks.aliases())) {
            System.out.println("entry " + alias + " key=" + ks.isKeyEntry(alias)
                + " chain=" + (ks.getCertificateChain(alias) == null ? 0 : ks.getCertificateChain(alias).length));
        }
        KeyManagerFactory kmf = KeyManagerFactory.getInstance("SunX509");
        kmf.init(ks, new char[0]);
        KeyStore trust = KeyStore.getInstance("PKCS12");
        trust.load(null, null);
        try (InputStream in = new FileInputStream(args[1])) {
            trust.setCertificateEntry("root", CertificateFactory.getInstance("X.509").generateCertificate(in));
        }
        TrustManagerFactory tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        tmf.init(trust);
        X509KeyManager km = (X509KeyManager) kmf.getKeyManagers()[0];
        String alias = args[3];
        X509KeyManager only = new X509KeyManager() { // the client key the test names
            public String chooseClientAlias(String[] t, Principal[] i, Socket s) { return alias; }
            public String chooseServerAlias(String t, Principal[] i, Socket s) { return null; }
            public String[] getClientAliases(String t, Principal[] i) { return new String[] {alias}; }
            public String[] getServerAliases(String t, Principal[] i) { return null; }
            public X509Certificate[] getCertificateChain(String a) { return km.getCertificateChain(a); }
            public PrivateKey getPrivateKey(String a) { return km.getPrivateKey(a); }
        };
        SSLContext ctx = SSLContext.getInstance(args[4]);
        ctx.init(new javax.net.ssl.KeyManager[] {only}, tmf.getTrustManagers(), null);
        HttpsURLConnection c = (HttpsURLConnection) new URL(args[2]).openConnection();
        c.setSSLSocketFactory(ctx.getSocketFactory());
        try (InputStream in = c.getInputStream()) {
            System.out.println("response " + new String(in.readAllBytes()).trim());
        }
    }
}

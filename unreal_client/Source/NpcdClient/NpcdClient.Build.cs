using System.IO;
using UnrealBuildTool;

// Links the npcd C ABI (cpp_client) from ThirdParty/npcd_client, which
// scripts/build_clients.sh fills with the header and the per-platform library.
public class NpcdClient : ModuleRules
{
    public NpcdClient(ReadOnlyTargetRules Target) : base(Target)
    {
        PCHUsage = PCHUsageMode.UseExplicitOrSharedPCHs;
        PublicDependencyModuleNames.AddRange(new[] { "Core", "CoreUObject", "Engine", "DeveloperSettings" });
        // IPluginManager: the module finds the plugin's copy of the Windows DLL (NpcdClientModule.cpp).
        PrivateDependencyModuleNames.Add("Projects");

        string root = Path.Combine(PluginDirectory, "ThirdParty", "npcd_client");
        PublicIncludePaths.Add(Path.Combine(root, "include"));

        if (Target.Platform == UnrealTargetPlatform.Win64)
        {
            string lib = Path.Combine(root, "lib", "Win64");
            PublicAdditionalLibraries.Add(Path.Combine(lib, "npcd_client.lib"));
            PublicDelayLoadDLLs.Add("npcd_client.dll");
            RuntimeDependencies.Add("$(BinaryOutputDir)/npcd_client.dll", Path.Combine(lib, "npcd_client.dll"));
        }
        else if (Target.Platform == UnrealTargetPlatform.Mac)
        {
            string lib = Path.Combine(root, "lib", "Mac", "libnpcd_client.dylib");
            PublicAdditionalLibraries.Add(lib);
            RuntimeDependencies.Add("$(BinaryOutputDir)/libnpcd_client.dylib", lib);
        }
        else if (Target.Platform == UnrealTargetPlatform.Linux)
        {
            string lib = Path.Combine(root, "lib", "Linux", "libnpcd_client.so");
            PublicAdditionalLibraries.Add(lib);
            RuntimeDependencies.Add("$(BinaryOutputDir)/libnpcd_client.so", lib);
        }
    }
}
